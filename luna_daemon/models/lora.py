"""LoRA cache: content-addressed, byte-budgeted, LRU.

What a caller can rely on:

* A LoRA is identified by the SHA-256 of its file content -- never by its name, so two
  different files called ``style.safetensors`` never collide and a renamed copy hits.
* ``put`` (bytes uploaded by a client that cannot share files with the daemon) and
  ``load_path`` (a regular file under ``model_roots``) parse safetensors only (no pickle).
* The parsed weights live within ``lora_cache_bytes``. Making room evicts the least
  recently used entries; a LoRA larger than the whole budget is refused with
  ``too_large`` **before** anything is evicted -- and, judged from the safetensors header,
  before its tensors are read.
* ``resolve_stack`` turns a request's ``[{lora, strength}]`` into engine
  :class:`LoraSpec` objects keyed by the target model's ``patchable_keys()``.

Supported key conventions (text-encoder parts only; UNet keys are ignored):
kohya ``lora_te_*`` (SD1), ``lora_te1_*`` / ``lora_te2_*`` (SDXL CLIP-L / CLIP-G) with
``.lora_up/.lora_down`` and optional ``.alpha``; diffusers / PEFT
``text_encoder[_2].<module>.lora_A/.lora_B`` (also ``.lora.up/.down``,
``.lora_linear_layer.up/.down``, ``.lora_B.default``) and ``.alpha``; and ComfyUI's generic
form ``text_encoders.<model key without .weight>`` (same up/down suffixes), which names one
weight of the target model's state dict exactly (``text_encoders.clip_l.transformer.text_model.
encoder.layers.0.self_attn.q_proj``). The ComfyUI proxies serialise ``add_patches`` calls in
that form; it maps only onto a model whose ``patchable_keys()`` contain the exact key.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from luna_daemon import fsutil
from luna_daemon.models.engines.base import LoraSpec
from luna_daemon.protocol import ErrorCode, LunaError
from luna_daemon.units import fmt_bytes

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"[0-9a-f]{64}")  # a content id: lower-case hex SHA-256
# (up, down) suffix pairs, as the kohya / diffusers / PEFT writers spell them.
_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
_KOHYA_PREFIX = {"lora_te_": "te", "lora_te1_": "te1", "lora_te2_": "te2"}
# ComfyUI's generic LoRA naming: the rest of the name is a model state-dict key minus ".weight".
_EXACT_PREFIX = "text_encoders."
_EXACT_TAG = "key"
_DIFFUSERS_PREFIX = {"text_encoder.": "te", "text_encoder_2.": "te2", "te.": "te", "te1.": "te1", "te2.": "te2"}


def _norm(name: str) -> str:
    """Canonical module name: ``text_model.encoder.layers.0.self_attn.q_proj`` ->
    ``text_model_encoder_layers_0_self_attn_q_proj`` (the kohya spelling)."""
    name = name.removesuffix(".weight")
    if not name.startswith("text_model"):
        name = "text_model." + name
    return name.replace(".", "_")


def _exact_target(base: str) -> tuple[str | None, str | None]:
    """``text_encoders.<key stem>`` -> (``"key"``, ``"<key stem>.weight"``); else (None, None)."""
    if base.startswith(_EXACT_PREFIX) and len(base) > len(_EXACT_PREFIX):
        return _EXACT_TAG, base[len(_EXACT_PREFIX):] + ".weight"
    return None, None


@dataclass
class ParsedLora:
    sha256: str
    name: str
    # (encoder tag "te"/"te1"/"te2", canonical module name) -> (up, down, alpha|None)
    modules: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float | None]]
    nbytes: int

    def describe(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "name": self.name, "modules": len(self.modules), "bytes": self.nbytes}


def _te_pairs(keys: Any) -> Iterator[tuple[str, str, str, str, str]]:
    """The text-encoder low-rank pairs among a LoRA's tensor names:
    ``(up key, down key, alpha key, encoder tag, canonical module)``. UNet keys are skipped."""
    keys = dict.fromkeys(keys)  # ordered: with duplicates of one module, the last one wins, as before
    for key in keys:
        for up_sfx, down_sfx in _PAIRS:
            if not key.endswith(up_sfx):
                continue
            base = key[: -len(up_sfx)]
            if base + down_sfx not in keys:
                continue
            tag, mod = _exact_target(base)
            for pfx, t in (_KOHYA_PREFIX if tag is None else {}).items():
                if base.startswith(pfx):
                    tag, mod = t, base[len(pfx):]
                    if not mod.startswith("text_model"):
                        mod = "text_model_" + mod
                    break
            else:
                for pfx, t in (_DIFFUSERS_PREFIX if tag is None else {}).items():
                    if base.startswith(pfx):
                        tag, mod = t, _norm(base[len(pfx):])
                        break
            if tag is None:
                continue  # a UNet key (lora_unet_*, unet.*): not ours
            yield key, base + down_sfx, base + ".alpha", tag, mod
            break


def _no_te_weights(label: str) -> LunaError:
    return LunaError(ErrorCode.BAD_ARGS, f"LoRA {label} has no text-encoder weights in a known format (kohya lora_te*, diffusers/PEFT text_encoder*)")


def parse_lora(state: dict[str, torch.Tensor], sha256: str, name: str = "") -> ParsedLora:
    """Extract the text-encoder low-rank pairs from a LoRA state dict."""
    modules: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    for up_key, down_key, alpha_key, tag, mod in _te_pairs(state):
        alpha_t = state.get(alpha_key)
        alpha = float(alpha_t.item()) if isinstance(alpha_t, torch.Tensor) and alpha_t.numel() == 1 else None
        up, down = state[up_key], state[down_key]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0]:
            base = alpha_key.removesuffix(".alpha")
            raise LunaError(ErrorCode.BAD_ARGS, f"LoRA {name or sha256[:12]}: {base} has mismatched up/down shapes {tuple(up.shape)} / {tuple(down.shape)}")
        modules[(tag, mod)] = (up.contiguous(), down.contiguous(), alpha)
    if not modules:
        raise _no_te_weights(name or sha256[:12])
    nbytes = sum(u.numel() * u.element_size() + d.numel() * d.element_size() for u, d, _ in modules.values())
    return ParsedLora(sha256, name, modules, nbytes)


def _te_tensor_names(header: fsutil.SafetensorsHeader, label: str) -> tuple[list[str], int]:
    """The tensors :func:`parse_lora` keeps (up, down, alpha) and the bytes of its up/down
    weights -- what the LoRA will cost in the cache -- read from the header alone."""
    names, nbytes = [], 0
    for up_key, down_key, alpha_key, _tag, _mod in _te_pairs(header.tensors):
        names += [up_key, down_key] + ([alpha_key] if alpha_key in header.tensors else [])
        nbytes += header.nbytes((up_key, down_key))
    if not names:
        raise _no_te_weights(label)
    return names, nbytes


def _load_safetensors_bytes(data: bytes | bytearray | memoryview, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except Exception as exc:  # SafetensorError (not exported under a stable name), ValueError...
        raise LunaError(ErrorCode.BAD_ARGS, f"{what} is not a valid .safetensors file: {exc}") from None


def _header(read: Any, label: str) -> fsutil.SafetensorsHeader:
    try:
        return read()
    except ValueError as exc:
        raise LunaError(ErrorCode.BAD_ARGS, f"{label} is not a valid .safetensors file: {exc}") from None


def map_to_model(lora: ParsedLora, patchable_keys: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """Key the LoRA's modules by the model's patchable keys.

    Keys may carry an encoder prefix ``"l:"`` / ``"g:"`` (SDXL) or ComfyUI's
    ``clip_l.transformer.`` / ``clip_g.transformer.`` names; ``te``/``te1`` target
    CLIP-L (or the only encoder), ``te2`` targets CLIP-G.
    """
    index: dict[tuple[str, str], str] = {}
    encs = set()
    exact = set(patchable_keys)
    for key in patchable_keys:
        enc, name = "l", key
        if ":" in key:
            enc, name = key.split(":", 1)
        elif key.startswith(("clip_l.", "clip_g.", "clip_h.")):
            enc = key[5]
            name = key.split(".transformer.", 1)[-1] if ".transformer." in key else key[7:]
        encs.add(enc)
        index[(enc, _norm(name))] = key
    only_g = encs == {"g"}
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = {}
    for (tag, mod), triple in lora.modules.items():
        if tag == _EXACT_TAG:
            if mod in exact:
                out[mod] = triple
            continue
        enc = "g" if tag == "te2" or only_g else "l"
        target = index.get((enc, mod))
        if target is not None:
            out[target] = triple
    return out


class LoraCache:
    """Thread-safe LRU of parsed LoRAs within ``settings.lora_cache_bytes``."""

    @property
    def budget(self) -> int:
        # Read on each use: lora_cache_bytes applies live (an edited config.toml); a
        # smaller budget evicts at the next insert.
        return self.settings.lora_cache_bytes

    def __init__(self, settings, registry=None, events=None):
        self.settings = settings
        self.registry = registry
        self.events = events
        self._entries: collections.OrderedDict[str, ParsedLora] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ------------------------------------------------------------ queries
    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": sum(e.nbytes for e in self._entries.values()),
                    "budget": self.budget, "hits": self.hits, "misses": self.misses, "evictions": self.evictions}

    def has(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._entries

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e.describe() for e in self._entries.values()]

    # ------------------------------------------------------------ adding
    def put(self, data: bytes | bytearray | memoryview, sha256: str | None = None, name: str = "") -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and sha256.lower() != digest:
            raise LunaError(ErrorCode.BAD_ARGS, f"uploaded LoRA hashes to {digest}, not the announced {sha256}")
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return {**self._entries[digest].describe(), "cached": True}
        label = name or "uploaded LoRA"
        # The header says what the LoRA will cost: refuse before deserialising anything.
        header = _header(lambda: fsutil.safetensors_header_of(data), label)
        self._check_budget(_te_tensor_names(header, label)[1], label)
        parsed = parse_lora(_load_safetensors_bytes(data, label), digest, name)
        return self._insert(parsed)

    def load_path(self, path: Path) -> dict[str, Any]:
        """Cache the LoRA file at ``path`` (already resolved under the model roots).

        It must be a regular file (a FIFO, socket, device or folder is ``bad_args``, checked
        without blocking). Only its header is read before the LoRA is checked against
        ``lora_cache_bytes`` (``too_large``); then the file is hashed in chunks and only its
        text-encoder tensors are read."""
        from safetensors import safe_open

        label = path.name
        with fsutil.open_regular(path, "LoRA") as fh:
            header = _header(lambda: fsutil.safetensors_header(fh.read_at, fh.size), label)
            names, need = _te_tensor_names(header, label)
            self._check_budget(need, label)
            digest = hashlib.sha256()
            for chunk in fh.chunks():
                digest.update(chunk)
            sha = digest.hexdigest()
            with self._lock:
                if sha in self._entries:
                    self._entries.move_to_end(sha)
                    return {**self._entries[sha].describe(), "cached": True}
            try:
                with safe_open(fh.os_path, framework="pt", device="cpu") as f:
                    # Copies: the file may be rewritten while the LoRA stays cached.
                    state = {k: f.get_tensor(k).clone() for k in names}
            except Exception as exc:  # noqa: BLE001 - SafetensorError has no stable import name
                raise LunaError(ErrorCode.BAD_ARGS, f"{label} is not a valid .safetensors file: {exc}") from None
        return self._insert(parse_lora(state, sha, label))

    def _check_budget(self, nbytes: int, label: str) -> None:
        if nbytes > self.budget:
            # Refuse before touching the cache: an oversized LoRA must not flush it.
            raise LunaError(ErrorCode.TOO_LARGE, f"LoRA {label} needs {fmt_bytes(nbytes)}, more than the whole "
                            f"LoRA cache (lora_cache_bytes = {fmt_bytes(self.budget)}); raise lora_cache_bytes")

    def _insert(self, parsed: ParsedLora) -> dict[str, Any]:
        self._check_budget(parsed.nbytes, parsed.name or parsed.sha256[:12])
        evicted = []
        with self._lock:
            used = sum(e.nbytes for e in self._entries.values())
            while used + parsed.nbytes > self.budget and self._entries:
                sha, old = self._entries.popitem(last=False)
                used -= old.nbytes
                evicted.append(old.name or sha[:12])
                self.evictions += 1
            self._entries[parsed.sha256] = parsed
        if evicted:
            log.info("LoRA cache full: evicted %s", ", ".join(evicted))
        log.info("LoRA %s cached (%d modules, %s)", parsed.name or parsed.sha256[:12], len(parsed.modules), fmt_bytes(parsed.nbytes))
        return {**parsed.describe(), "cached": False, "evicted": evicted}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    # ------------------------------------------------------------ use
    def get(self, sha256: str) -> ParsedLora:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None:
                self.misses += 1
                raise LunaError(ErrorCode.NOT_FOUND, f"LoRA {sha256[:12]}... is not in the daemon's cache; send it with lora_put or lora_load first")
            self.hits += 1
            self._entries.move_to_end(sha256)
            return entry

    def resolve_stack(self, stack: Any, patchable_keys: Sequence[str]) -> list[LoraSpec]:
        """``[{"lora": sha256, "strength": float}, ...]`` -> engine LoraSpecs."""
        if not isinstance(stack, list):
            raise LunaError(ErrorCode.BAD_ARGS, "loras must be a list of {lora, strength}")
        specs = []
        for item in stack:
            if not isinstance(item, dict):
                raise LunaError(ErrorCode.BAD_ARGS, "each LoRA entry must be {lora: sha256, strength: number}")
            sha = item.get("lora", item.get("sha256"))
            strength = item.get("strength", 1.0)
            if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha):
                raise LunaError(ErrorCode.BAD_ARGS, "LoRA id must be the 64-hex-digit SHA-256 of the file")
            if isinstance(strength, bool) or not isinstance(strength, (int, float)):
                raise LunaError(ErrorCode.BAD_ARGS, "LoRA strength must be a number")
            parsed = self.get(sha)
            weights = map_to_model(parsed, patchable_keys)
            if not weights:
                log.warning("LoRA %s matches no weight of this text encoder", parsed.name or sha[:12])
            specs.append(LoraSpec(sha, float(strength), weights))
        return specs
