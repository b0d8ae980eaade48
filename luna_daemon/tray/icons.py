"""The Luna mark: tray icon images (Pillow) and the dashboard favicon (SVG), from one geometry.

The mark is a round moon: a dark disc whose lit crescent is in the state colour, with a
light glyph on the dark side that names the state without colour -- ``pause`` = stopped
(gray), three ``dots`` = starting / stopping (yellow), ``check`` = running (green),
``cross`` = error (red). The dark disc is the outline on light panels; on dark panels the
crescent and the glyph carry it (every palette colour is >= 4:1 against black).

One description, two renderers: :func:`shapes` lists primitives (circles, rects, round
polylines) in painter's order for a given pixel size; :func:`mark` rasterises them, and
:func:`svg` writes the same list as SVG (the favicon is ``svg(BRAND, 32)``).

What a caller can rely on:

* :func:`mark` is rendered natively at each size (rim width and glyph strokes snapped to
  whole pixels, each pixel takes the paint covering most of it), so 16, 24 and 32 px are
  crisp: every pixel is fully opaque or fully transparent and has one of the palette,
  ``OUTLINE`` or ``GLYPH`` colours. Images are RGBA, cached, shared: copy before drawing.
* :func:`classify` / :func:`dominant_colour` read the state colour back from pixels
  (screenshots in tests and the startup benchmark); the outline and the glyph never
  classify as a palette colour.
* ``python -m luna_daemon.tray.icons`` rewrites the favicons in ``web/static`` and
  ``docs/icon.png`` (the Comfy Registry icon); a test checks the files match this module.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from luna_daemon.tray.menu import COLOURS, GRAY, GREEN, RED, YELLOW

# Fill colours. Far apart in hue *and* brightness (grayscale 150 / 187 / 126 / 92) so
# screenshots classify robustly; the glyph, not the colour, is what must tell them apart.
RGB = {
    "gray": (150, 150, 150),
    "yellow": (245, 190, 20),
    "green": (30, 185, 70),
    "red": (225, 35, 35),
}
OUTLINE = (29, 32, 38)  # the dark side of the moon; also the dashboard's dark background
GLYPH = (246, 247, 249)
BRAND = "brand"  # the favicon's crescent: no state, so no glyph
BRAND_RGB = (228, 230, 234)
GLYPHS = {GRAY: "pause", YELLOW: "dots", GREEN: "check", RED: "cross"}
SIZES = (16, 24, 32)  # what panels show; each is drawn natively, not scaled from a big one
_SUB = 6  # samples per pixel side when rasterising: 36 votes decide each pixel


@dataclass(frozen=True)
class Circle:
    cx: float
    cy: float
    r: float
    paint: str


@dataclass(frozen=True)
class Rect:
    x0: float
    y0: float
    x1: float
    y1: float
    paint: str


@dataclass(frozen=True)
class Stroke:
    """A polyline with round caps and joins (the SVG ``stroke-linecap/linejoin="round"``)."""

    points: tuple[tuple[float, float], ...]
    width: float
    paint: str


Shape = Circle | Rect | Stroke


def _rgb(paint: str) -> tuple[int, int, int]:
    return {"outline": OUTLINE, "glyph": GLYPH, BRAND: BRAND_RGB}.get(paint) or RGB[paint]


def _check(colour: str) -> None:
    if colour not in COLOURS and colour != BRAND:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")


def shapes(colour: str, size: int) -> list[Shape]:
    """The mark for ``colour`` at ``size`` px, as primitives in pixel units, painter's order.

    Widths are snapped to whole pixels for ``size`` (a 1 px rim at 16 and 24, 2 px at 32)
    so the natively rendered image has no half-covered rows; larger sizes scale smoothly.
    """
    _check(colour)
    s = float(size)
    c = s / 2
    rim = max(1, size // 16)
    # The shadow disc sits up-right so the crescent is thick on the lower left and the
    # glyph gets the largest free circle; its edge passes outside the rim on the right.
    sx, sy, sr = c + 0.13 * s, c - 0.05 * s, 0.38 * s
    out: list[Shape] = [
        Circle(c, c, c, "outline"),
        Circle(c, c, c - rim, colour),
        Circle(sx, sy, sr, "outline"),
    ]
    glyph = GLYPHS.get(colour)
    if glyph is None:
        return out
    h = 0.20 * s  # half the glyph box: 3.2 px at 16 leaves a dark margin inside the shadow
    w = max(2.0, round(0.085 * s))  # stroke width in whole pixels: 2 at 16 and 24, 3 at 32
    gx, gy = sx - 0.01 * s, sy + 0.04 * s

    def p(u: float, v: float) -> tuple[float, float]:
        return (round(gx + u * h, 3), round(gy + v * h, 3))

    if glyph == "check":
        out.append(Stroke((p(-0.85, 0.05), p(-0.25, 0.65), p(0.9, -0.6)), w, "glyph"))
    elif glyph == "cross":
        out.append(Stroke((p(-0.7, -0.7), p(0.7, 0.7)), w, "glyph"))
        out.append(Stroke((p(-0.7, 0.7), p(0.7, -0.7)), w, "glyph"))
    elif glyph == "pause":
        bar = max(1.0, round(0.1 * s))
        gap = max(1.0, round(0.16 * s))
        x0 = round(gx - gap / 2 - bar)
        y0, y1 = round(gy - 0.85 * h), round(gy + 0.85 * h)
        out.append(Rect(x0, y0, x0 + bar, y1, "glyph"))
        out.append(Rect(x0 + bar + gap, y0, x0 + 2 * bar + gap, y1, "glyph"))
    else:  # dots: centred on pixel corners with whole-pixel spacing, so at 16 px each
        # dot is a clean 2×2 block instead of an L-shaped scrap
        d = max(2, round(0.11 * s))  # dot diameter in pixels
        step = d + max(1, round(0.07 * s))
        cx0, cy0 = round(gx - d / 2) + d / 2, round(gy - d / 2) + d / 2
        for i in (-1, 0, 1):
            out.append(Circle(cx0 + i * step, cy0, 0.5 * d + 0.1, "glyph"))
    return out


def _inside(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if isinstance(shape, Circle):
        return (x - shape.cx) ** 2 + (y - shape.cy) ** 2 <= shape.r ** 2
    if isinstance(shape, Rect):
        return (x >= shape.x0) & (x <= shape.x1) & (y >= shape.y0) & (y <= shape.y1)
    hit = np.zeros(x.shape, dtype=bool)
    r2 = (shape.width / 2) ** 2
    for (ax, ay), (bx, by) in zip(shape.points, shape.points[1:]):
        dx, dy = bx - ax, by - ay
        t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        hit |= (x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2 <= r2
    return hit


def paint_map(colour: str, size: int) -> tuple[np.ndarray, list[str]]:
    """(``size``×``size`` int array of paint indices, the paint names; -1 = transparent).

    Each pixel takes the topmost paint at most of its ``_SUB``² sample points (transparent
    included), which keeps edges hard: no blended pixel exists to turn to mush on a panel.
    """
    paints: list[str] = []
    offsets = (np.arange(size * _SUB) + 0.5) / _SUB
    y, x = np.meshgrid(offsets, offsets, indexing="ij")
    top = np.full(x.shape, -1, dtype=np.int16)
    for shape in shapes(colour, size):
        if shape.paint not in paints:
            paints.append(shape.paint)
        top[_inside(shape, x, y)] = paints.index(shape.paint)
    votes = np.stack([(top == k) for k in range(-1, len(paints))])  # (paints+1, H*S, W*S)
    counts = votes.reshape(len(paints) + 1, size, _SUB, size, _SUB).sum(axis=(2, 4))
    return counts.argmax(axis=0) - 1, paints


@lru_cache(maxsize=64)
def mark(colour: str, size: int = 32) -> Image.Image:
    """An RGBA ``size``×``size`` Luna mark in ``colour`` (one of ``menu.COLOURS``, or BRAND).

    The returned image is shared (cached): callers must not draw on it; copy first.
    """
    index, paints = paint_map(colour, size)
    lut = np.array([(0, 0, 0, 0)] + [(*_rgb(p), 255) for p in paints], dtype=np.uint8)
    return Image.fromarray(lut[index + 1], "RGBA")


def _num(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".")


def svg(colour: str = BRAND, size: int = 32) -> str:
    """The mark as a standalone SVG document (viewBox ``0 0 size size``), same primitives."""
    parts = []
    for sh in shapes(colour, size):
        fill = "#{:02x}{:02x}{:02x}".format(*_rgb(sh.paint))
        if isinstance(sh, Circle):
            parts.append(f'<circle cx="{_num(sh.cx)}" cy="{_num(sh.cy)}" r="{_num(sh.r)}" fill="{fill}"/>')
        elif isinstance(sh, Rect):
            parts.append(f'<rect x="{_num(sh.x0)}" y="{_num(sh.y0)}" width="{_num(sh.x1 - sh.x0)}" '
                         f'height="{_num(sh.y1 - sh.y0)}" fill="{fill}"/>')
        else:
            pts = " ".join(f"{_num(x)},{_num(y)}" for x, y in sh.points)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{fill}" stroke-width="{_num(sh.width)}" '
                         'stroke-linecap="round" stroke-linejoin="round"/>')
    body = "".join(parts)
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}">{body}</svg>\n'


def classify(rgb: tuple[int, int, int], tolerance: int = 60) -> str | None:
    """The palette colour nearest to ``rgb`` if within ``tolerance`` (Euclidean), else None.

    Used by tests and the benchmark to read the icon back from a screenshot.
    """
    best, best_d = None, float("inf")
    for name, ref in RGB.items():
        d = math.dist(rgb[:3], ref)
        if d < best_d:
            best, best_d = name, d
    return best if best_d <= tolerance else None


def dominant_colour(img: Image.Image, min_pixels: int = 12) -> str | None:
    """The palette colour most pixels of ``img`` match (None if fewer than ``min_pixels``)."""
    counts: dict[str, int] = {}
    rgba = img.convert("RGBA")
    for r, g, b, a in rgba.getdata():
        if a < 128:
            continue
        name = classify((r, g, b), tolerance=45)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return None
    name, n = max(counts.items(), key=lambda kv: kv[1])
    return name if n >= min_pixels else None


STATIC = Path(__file__).resolve().parents[1] / "web" / "static"
DOCS_ICON = Path(__file__).resolve().parents[2] / "docs" / "icon.png"


def generated_files() -> dict[Path, bytes]:
    """What ``python -m luna_daemon.tray.icons`` writes: path -> exact content."""
    files = {STATIC / "favicon.svg": svg(BRAND).encode()}
    for colour in COLOURS:
        files[STATIC / f"favicon-{colour}.svg"] = svg(colour).encode()
    return files


def main() -> int:
    """Rewrite the favicons and docs/icon.png from the geometry above (a maintainer tool)."""
    for path, data in generated_files().items():
        path.write_bytes(data)
    if DOCS_ICON.parent.is_dir():  # a source checkout; an installed wheel has no docs/
        mark(GREEN, 256).save(DOCS_ICON)
    return 0


if __name__ == "__main__":
    sys.exit(main())
