"""Tiled application of a spatial function (VAE encode / decode) with blended seams.

Pure functions, no model knowledge: the caller hands in a callable that maps a
``[B, C, h, w]`` tile to a ``[B, C', h*scale, w*scale]`` result, and gets back the whole
output assembled from overlapping tiles.

What a caller can rely on:

* ``tiled_map`` covers the input with tiles of at most ``tile_h x tile_w`` input pixels that
  overlap their neighbours by ``overlap`` pixels (the last tile of a row/column is shifted
  back so it ends exactly at the border, overlapping more). Inside an overlap each tile's
  contribution is weighted by a linear ramp that rises away from the tile's inner edges, and
  the weights are normalised, so seams blend instead of cutting. Borders of the whole image
  are never feathered.
* When the input fits into a single tile the callable is applied once to the whole input,
  so the result is exactly ``fn(x)``.
* ``tiled_map_three_pass`` mirrors ComfyUI's 2-D ``decode_tiled`` / ``encode_tiled``: the
  mean of three ``tiled_map`` passes with tile shapes ``(x, y)``, ``(x/2, 2y)`` and
  ``(2x, y/2)`` (``x`` = width, ``y`` = height), which hides the seams of any single pass.
* ``align`` keeps every tile origin and size a multiple of ``align`` input pixels. Encoders
  need it (``align`` = downscale ratio) so that tile positions map onto whole latent pixels.
* The result is float32 on the device the callable returned its tiles on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

TileFn = Callable[[torch.Tensor], torch.Tensor]


def _round_down(value: int, align: int) -> int:
    return (value // align) * align


def normalise_tile(tile: int, overlap: int, align: int = 1) -> tuple[int, int]:
    """Return a usable ``(tile, overlap)`` pair: aligned, tile >= align, 0 <= overlap < tile.

    An overlap that would leave no stride (``overlap >= tile``) is cut to a quarter of the
    tile, the same rule ComfyUI's tiled nodes apply to oversized overlaps.
    """
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    tile = max(align, _round_down(int(tile), align))
    overlap = max(0, _round_down(int(overlap), align))
    if overlap >= tile:
        overlap = _round_down(tile // 4, align)
    return tile, overlap


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of the tiles covering ``[0, length)``; the last tile ends at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, feather: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D weights: 1 inside, rising linearly over ``feather`` samples at blended edges."""
    weights = torch.ones(size, dtype=torch.float32)
    feather = min(feather, size // 2)
    if feather <= 0:
        return weights
    # (i + 1) / (feather + 1) never reaches 0, so every output pixel keeps a positive
    # total weight even where only one tile covers it.
    ramp = torch.arange(1, feather + 1, dtype=torch.float32) / (feather + 1)
    if ramp_start:
        weights[:feather] = ramp
    if ramp_end:
        weights[size - feather:] = torch.flip(ramp, dims=[0])
    return weights


def _scaled(value: int, scale: float) -> int:
    return round(value * scale)


def tiled_map(
    fn: TileFn,
    x: torch.Tensor,
    *,
    tile_h: int,
    tile_w: int,
    overlap: int,
    scale: float,
    align: int = 1,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` ``[B, C, H, W]`` and blend the results.

    ``scale`` is output pixels per input pixel (8 for an SD decoder, 1/8 for its encoder).
    ``H`` and ``W`` must be multiples of ``align``. Raises ``ValueError`` on bad geometry
    or when ``fn`` returns a tile of the wrong size.
    """
    if x.ndim != 4:
        raise ValueError(f"tiled_map expects [B, C, H, W], got shape {tuple(x.shape)}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    batch, _, height, width = x.shape
    if height % align or width % align:
        raise ValueError(f"input {height}x{width} is not a multiple of align={align}")
    tile_h, overlap_h = normalise_tile(tile_h, overlap, align)
    tile_w, overlap_w = normalise_tile(tile_w, overlap, align)
    ys = tile_starts(height, tile_h, overlap_h)
    xs = tile_starts(width, tile_w, overlap_w)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x).float()

    out_h, out_w = _scaled(height, scale), _scaled(width, scale)
    feather_h, feather_w = _scaled(overlap_h, scale), _scaled(overlap_w, scale)
    output: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    logger.debug("tiled_map: %dx%d input, %d x %d tiles of %dx%d, overlap %d/%d",
                 height, width, len(ys), len(xs), tile_h, tile_w, overlap_h, overlap_w)
    for y0 in ys:
        th = min(tile_h, height - y0)
        for x0 in xs:
            tw = min(tile_w, width - x0)
            result = fn(x[:, :, y0:y0 + th, x0:x0 + tw]).float()
            oy, ox = _scaled(y0, scale), _scaled(x0, scale)
            oh, ow = _scaled(th, scale), _scaled(tw, scale)
            if result.ndim != 4 or result.shape[0] != batch or tuple(result.shape[2:]) != (oh, ow):
                raise ValueError(
                    f"tile function returned shape {tuple(result.shape)}, expected [{batch}, C, {oh}, {ow}]"
                )
            if output is None:
                output = torch.zeros((batch, result.shape[1], out_h, out_w), dtype=torch.float32,
                                     device=result.device)
                weight_sum = torch.zeros((out_h, out_w), dtype=torch.float32, device=result.device)
            # Ramps only on edges that touch another tile: the image border keeps full
            # weight, so a lone tile's pixels are never attenuated.
            wy = _ramp(oh, feather_h, y0 > 0, y0 + th < height)
            wx = _ramp(ow, feather_w, x0 > 0, x0 + tw < width)
            mask = (wy[:, None] * wx[None, :]).to(result.device)
            output[:, :, oy:oy + oh, ox:ox + ow] += result * mask
            weight_sum[oy:oy + oh, ox:ox + ow] += mask
    assert output is not None and weight_sum is not None
    return output / weight_sum


def three_pass_shapes(tile_x: int, tile_y: int) -> list[tuple[int, int]]:
    """The ``(tile_x, tile_y)`` shapes of the three passes: (x, y), (x/2, 2y), (2x, y/2)."""
    return [
        (tile_x, tile_y),
        (max(1, tile_x // 2), tile_y * 2),
        (tile_x * 2, max(1, tile_y // 2)),
    ]


def tiled_map_three_pass(
    fn: TileFn,
    x: torch.Tensor,
    *,
    tile_x: int,
    tile_y: int,
    overlap: int,
    scale: float,
    align: int = 1,
) -> torch.Tensor:
    """Mean of three ``tiled_map`` passes with tile shapes (x, y), (x/2, 2y), (2x, y/2).

    ``tile_x`` is the tile width and ``tile_y`` its height, in input pixels, as ComfyUI's
    ``decode_tiled(tile_x=, tile_y=, overlap=)`` takes them.
    """
    if tile_x <= 0 or tile_y <= 0 or overlap < 0:
        raise ValueError(f"bad tile geometry tile_x={tile_x} tile_y={tile_y} overlap={overlap}")
    total: torch.Tensor | None = None
    for tw, th in three_pass_shapes(tile_x, tile_y):
        part = tiled_map(fn, x, tile_h=th, tile_w=tw, overlap=overlap, scale=scale, align=align)
        total = part if total is None else total + part
    assert total is not None
    return total / 3.0
