"""Tiny real-architecture models with random weights, built offline in well under a second.

Used by the tests, the ``demo`` command and the benchmarks. Every builder writes files in
the same layouts real models ship in, so the engines load them through their normal code
paths:

* ``make_tiny_vae``: a diffusers ``AutoencoderKL`` (4 levels -> 8x downscale), either as a
  diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or as one
  ``.safetensors`` file in diffusers key layout.
* ``make_tiny_clip``: a transformers CLIP text encoder, ``CLIPTextModel`` for ``kind="l"``
  and ``CLIPTextModelWithProjection`` for ``kind="g"``, with a small but real byte-level BPE
  tokenizer (``vocab.json`` + ``merges.txt``), either as a transformers folder or as one
  ``.safetensors`` file plus a ``<stem>.json`` sidecar config and a ``<stem>_tokenizer/``
  folder.
* ``make_big_vae``: an SD-shaped ``AutoencoderKL`` scaled to roughly a target size, for
  memory benchmarks.

The tokenizer vocabulary has the size (49408) and special-token ids (BOS 49406, EOS 49407)
of the real CLIP vocabulary; ids between the learned merges and the special tokens are
unused filler entries. Any text tokenizes: unknown words fall back to byte-level symbols.
Weights are seeded, so the same arguments always give the same files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words that get whole-word merges, so common prompts tokenize to a handful of ids instead
# of one id per character (keeps prompts short enough to fit in a chunk in tests).
_COMMON_WORDS = (
    "a an the of and in on with at to by for is photo picture painting portrait cat dog "
    "horse astronaut riding man woman girl boy red blue green white black light dark "
    "masterpiece best quality detailed high beautiful landscape city night day sky sun "
    "moon tree forest mountain river sea water fire house car street style art"
).split()


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table byte-level BPE vocabularies use.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, ...)
    map to code points from 256 upwards, so every byte has a visible, unique symbol.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        best = min(((ranks.get(pair, math.inf), pair) for pair in itertools.pairwise(symbols)), key=lambda t: t[0])
        if best[0] == math.inf:
            break
        first, second = best[1]
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges under which each word tokenizes to the single token ``word</w>``.

    Each word is first run through the merges learned so far, then left-to-right merges are
    appended until it is one symbol. A merge added later has a higher rank than every merge
    an earlier word needed, so it can never break an earlier word apart.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_bpe(symbols, ranks)
    return merges


def build_clip_vocab(words: Sequence[str] = _COMMON_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return ``(vocab, merges)`` for a CLIP-style byte-level BPE tokenizer.

    ``vocab`` has exactly 49408 entries with BOS at 49406 and EOS at 49407.
    """
    symbols = list(_byte_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = _word_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    filler = 0
    while len(vocab) < BOS_ID:
        vocab[f"<|unused{filler}|>"] = len(vocab)
        filler += 1
    vocab[BOS_TOKEN] = BOS_ID
    vocab[EOS_TOKEN] = EOS_ID
    return vocab, merges


def write_clip_tokenizer(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` (loadable by ``CLIPTokenizer.from_pretrained``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The first line is a version header: CLIP's merges files have one and the loaders skip it.
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's RNG inside a fork of its state, so builders never disturb the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# --------------------------------------------------------------------------------- VAE


def _vae_config(block_out_channels: Sequence[int], latent_channels: int, layers_per_block: int,
                norm_num_groups: int) -> dict:
    levels = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": tuple(int(c) for c in block_out_channels),
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
    }


def _write_vae(module, folder: Path, layout: str, stem: str) -> Path:
    if layout == "folder":
        folder.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(str(folder), safe_serialization=True)
        return folder
    if layout == "file":
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}.safetensors"
        _save_file(module.state_dict(), path)
        return path
    raise ValueError(f"layout must be 'folder' or 'file', got {layout!r}")


def make_tiny_vae(
    dir: str | os.PathLike,
    *,
    layout: str = "folder",
    seed: int = 0,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 32,
) -> Path:
    """Build a random-weight ``AutoencoderKL`` and write it under ``dir``.

    Returns the path to load: the folder itself (``layout="folder"``) or
    ``dir/tiny_vae.safetensors`` (``layout="file"``). With ``norm_num_groups`` other than 32
    a file layout also gets the ``tiny_vae.json`` sidecar the engine reads it from.
    """
    from diffusers import AutoencoderKL

    config = _vae_config(block_out_channels, latent_channels, layers_per_block, norm_num_groups)
    with _seeded(seed):
        module = AutoencoderKL(**config).eval()
    path = _write_vae(module, Path(dir), layout, "tiny_vae")
    if layout == "file" and norm_num_groups != 32:
        (Path(dir) / "tiny_vae.json").write_text(json.dumps({"norm_num_groups": norm_num_groups}))
    logger.debug("tiny VAE written to %s", path)
    return path


def _vae_param_count(channels: Sequence[int], layers_per_block: int) -> int:
    from diffusers import AutoencoderKL

    # Built on the meta device: counting parameters costs no memory and no init time.
    with torch.device("meta"):
        module = AutoencoderKL(**_vae_config(channels, 4, layers_per_block, 32))
    return sum(p.numel() for p in module.parameters())


def big_vae_shape(target_bytes: int, *, bytes_per_param: int = 4) -> tuple[tuple[int, ...], int]:
    """``(block_out_channels, layers_per_block)`` of the largest SD-shaped VAE (channel ratios
    1:2:4:4, base a multiple of 32, 1-3 layers per block) not above ``target_bytes``."""
    candidates: list[tuple[int, tuple[int, ...], int]] = []
    for layers in (1, 2, 3):
        # Every weight scales with base^2, every bias/norm with base: the parameter count is
        # an exact quadratic in the base width, so three small probes determine it.
        p32, p64, p96 = (_vae_param_count((b, 2 * b, 4 * b, 4 * b), layers) for b in (32, 64, 96))
        quad = (p96 - 2 * p64 + p32) / (2 * 32 * 32)
        lin = (p64 - p32) / 32 - quad * (64 + 32)
        const = p32 - quad * 32 * 32 - lin * 32
        base = 32
        while True:
            size = round(quad * base * base + lin * base + const) * bytes_per_param
            candidates.append((size, (base, 2 * base, 4 * base, 4 * base), layers))
            if size > target_bytes:
                break
            base += 32
    fitting = [c for c in candidates if c[0] <= target_bytes]
    _, channels, layers = max(fitting) if fitting else min(candidates)
    return channels, layers


def make_big_vae(
    dir: str | os.PathLike,
    target_bytes: int = 300 * 1024 * 1024,
    *,
    layout: str = "file",
    seed: int = 0,
) -> Path:
    """Write an SD-shaped random ``AutoencoderKL`` of roughly ``target_bytes`` fp32 weights.

    Channels are scaled in steps of 32 and 1-3 layers per block (the real SD VAE,
    128/256/512/512 with 2 layers, is ~335 MB); the result is the largest such model not
    above the target (at least 32/64/128/128 with 1 layer). Returns the path to load, as
    ``make_tiny_vae`` does (file stem ``big_vae``).
    """
    from diffusers import AutoencoderKL

    channels, layers = big_vae_shape(target_bytes)
    with _seeded(seed):
        module = AutoencoderKL(**_vae_config(channels, 4, layers, 32)).eval()
    path = _write_vae(module, Path(dir), layout, "big_vae")
    logger.info("big VAE %s x%d layers (%d params) written to %s", channels, layers,
                sum(p.numel() for p in module.parameters()), path)
    return path


# -------------------------------------------------------------------------------- CLIP


def tiny_clip_config(kind: str = "l", *, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                     projection_dim: int | None = None):
    """The ``CLIPTextConfig`` ``make_tiny_clip`` uses (quick_gelu for "l", gelu for "g")."""
    from transformers import CLIPTextConfig

    if kind not in ("l", "g"):
        raise ValueError(f"kind must be 'l' or 'g', got {kind!r}")
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        # OpenAI's CLIP-L uses quick_gelu, OpenCLIP's bigG (SDXL's second encoder) plain gelu.
        hidden_act="quick_gelu" if kind == "l" else "gelu",
        projection_dim=projection_dim or hidden_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=1,
    )


def make_tiny_clip(
    dir: str | os.PathLike,
    *,
    kind: str = "l",
    layout: str = "folder",
    seed: int = 0,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
) -> Path:
    """Build a random-weight CLIP text encoder plus tokenizer under ``dir``.

    ``kind="l"`` -> ``CLIPTextModel``; ``kind="g"`` -> ``CLIPTextModelWithProjection``.
    ``layout="folder"``: ``dir`` gets ``config.json``, ``model.safetensors``, ``vocab.json``,
    ``merges.txt``; returns ``dir``. ``layout="file"``: ``dir/clip_<kind>.safetensors`` with
    HF key names (``text_model.*`` for "g", ``embeddings.*`` for "l", as transformers saves
    them), a ``clip_<kind>.json`` sidecar config and a ``clip_<kind>_tokenizer/`` folder;
    returns the file path.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = tiny_clip_config(kind, hidden_size=hidden_size, layers=layers, heads=heads)
    cls = CLIPTextModel if kind == "l" else CLIPTextModelWithProjection
    with _seeded(seed):
        module = cls(config).eval()
    folder = Path(dir)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        _save_file(module.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
        config.architectures = [cls.__name__]
        config.to_json_file(str(folder / "config.json"))
        write_clip_tokenizer(folder)
        return folder
    if layout == "file":
        stem = f"clip_{kind}"
        path = folder / f"{stem}.safetensors"
        _save_file(module.state_dict(), path)
        (folder / f"{stem}.json").write_text(json.dumps(config.to_dict(), indent=1))
        write_clip_tokenizer(folder / f"{stem}_tokenizer")
        return path
    raise ValueError(f"layout must be 'folder' or 'file', got {layout!r}")
