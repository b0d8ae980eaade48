"""The Engine interface every backend implements.

The service layer only ever talks to these classes. All tensors crossing this boundary
are CPU tensors in ComfyUI's layouts:

* pixels: float32 ``[B, H, W, C]`` in 0..1 (channels-last),
* latents: float32 ``[B, C, h, w]`` (raw, unscaled: no SD scale factor applied),
* tokens: ``{encoder_key: [chunk, ...]}`` where a chunk is a list of ``(token_id, weight)``
  tuples (77 per chunk for CLIP),
* conditioning: ``{"cond": float32 [1, T, D], "pooled_output": float32 [1, P] | None, **extras}``.

Engines are *not* required to be thread-safe: the registry runs every call for one loaded
model on that model's single executor thread, inside ``torch.inference_mode()``.
"""

from __future__ import annotations

import abc
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from luna_daemon.protocol import LunaError


class EngineError(LunaError):
    """An engine-level failure that maps onto a protocol error code.

    ``code`` is one of the protocol error codes (``model_error``, ``oom``, ``bad_args``,
    ``not_found`` ...); the message is shown to the user verbatim.
    """


@dataclass
class TiledArgs:
    """Tile geometry as ComfyUI's ``decode_tiled`` / ``encode_tiled`` take it.

    For decode the sizes are in latent pixels (default 64/64/16), for encode in image
    pixels (default 512/512/64). ``tile_t`` / ``overlap_t`` are the temporal sizes of a
    video VAE (latent frames for decode, raw frames for encode, as ComfyUI's nodes pass
    them); None leaves them to the VAE, and image VAEs ignore them, as in ComfyUI.
    """

    tile_x: int
    tile_y: int
    overlap: int
    tile_t: int | None = None
    overlap_t: int | None = None


# ComfyUI's defaults: decode tiles in latent pixels (VAEDecodeTiled's 512/64 px / 8),
# encode tiles in image pixels.
DEFAULT_DECODE_TILE = TiledArgs(tile_x=64, tile_y=64, overlap=16)
DEFAULT_ENCODE_TILE = TiledArgs(tile_x=512, tile_y=512, overlap=64)


@dataclass
class LoraSpec:
    """One entry of a LoRA stack: resolved LoRA weights plus strength.

    ``weights`` maps a key from ``ClipModel.patchable_keys()`` (an engine-defined key
    space) to a low-rank triple ``(up [out, r], down [r, in], alpha | None)``. The delta
    is ``strength * (alpha / r) * (up @ down)``, with ``alpha / r`` taken as 1.0 when
    alpha is None -- the same rule as ComfyUI's LoRA adapter.
    """

    sha256: str
    strength: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = field(default_factory=dict)


class LoadedModel(abc.ABC):
    """A loaded model object. ``nbytes`` is measured from its parameters and buffers."""

    kind: str = "model"
    device: torch.device
    dtype: torch.dtype

    @abc.abstractmethod
    def nbytes(self) -> int:
        ...

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """JSON-safe static facts a client needs (channels, ratios, encoders...)."""

    def cache_nbytes(self) -> int:
        """Memory the model holds besides its weights and may grow with use (the standalone
        CLIP's LoRA-patched weight copies). The registry counts it, with ``nbytes``, in the
        device's ``max_model_bytes`` budget. Must be cheap: it is read after every call."""
        return 0

    def release(self) -> None:
        """Drop every reference to weights so the memory can be returned. Idempotent."""


class VaeModel(LoadedModel):
    kind = "vae"

    @abc.abstractmethod
    def encode(self, pixels: torch.Tensor, tiled: TiledArgs | None = None) -> torch.Tensor:
        """BHWC 0..1 pixels -> BCHW raw latent (float32, CPU). Crops H/W to the ratio."""

    @abc.abstractmethod
    def decode(self, latent: torch.Tensor, tiled: TiledArgs | None = None) -> torch.Tensor:
        """BCHW latent -> BHWC float32 pixels clamped to 0..1 (CPU)."""


class ClipModel(LoadedModel):
    kind = "clip"

    @abc.abstractmethod
    def tokenize(self, text: str, **options: Any) -> dict[str, list[list[tuple]]]:
        ...

    @abc.abstractmethod
    def encode(
        self,
        tokens: dict[str, list[list[tuple]]],
        layer: int | None = None,
        loras: Sequence[LoraSpec] = (),
    ) -> dict[str, Any]:
        """Tokens -> ``{"cond", "pooled_output", **extras}``.

        ``layer`` follows CLIPSetLastLayer: ``None`` or ``-1`` = last layer, ``-2`` =
        penultimate, ... ``loras`` are applied for this call only; they must never be
        visible to another call (the shared weights are not modified in place).
        """

    def patchable_keys(self) -> list[str]:
        """Names of the text encoder's weights a LoRA may target (state-dict key space)."""
        return []


class Engine(abc.ABC):
    """Loads models. One instance per daemon; ``name`` shows in ``hello`` / ``status``."""

    name: str = "engine"

    @abc.abstractmethod
    def load_vae(self, paths: Sequence[str], device: torch.device, dtype: torch.dtype | None) -> VaeModel:
        ...

    @abc.abstractmethod
    def load_clip(
        self,
        paths: Sequence[str],
        clip_type: str,
        device: torch.device,
        dtype: torch.dtype | None,
    ) -> ClipModel:
        ...

    def close(self) -> None:
        """Release engine-global resources (caches). Called once at daemon stop."""


# ------------------------------------------------------------------------- helpers
def as_device(device: torch.device | str | None) -> torch.device:
    """``None`` -> the CPU; a bare ``cuda`` -> the current CUDA device, with its index."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def module_nbytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory failure: torch's OOM error, MemoryError, or an error that says so
    (MPS and some kernels raise a plain RuntimeError)."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------- load progress
_progress = threading.local()


@contextmanager
def load_progress(callback: Callable[[int], None]) -> Iterator[None]:
    """While a load runs in this thread, an engine that reads weights itself reports the
    bytes read so far (cumulative) to ``callback`` through :func:`weights_read`. Engines
    that cannot tell (ComfyUI's loader reads a file in one call) report nothing."""
    outer = getattr(_progress, "state", None)
    _progress.state = [callback, 0]
    try:
        yield
    finally:
        _progress.state = outer


def weights_read(nbytes: int) -> None:
    """Engines: ``nbytes`` more bytes of weights were read (a no-op outside a load)."""
    state = getattr(_progress, "state", None)
    if state is not None:
        state[1] += nbytes
        state[0](state[1])
