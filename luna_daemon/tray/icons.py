"""Tray icon images: one filled disc per colour, drawn with Pillow.

The disc is drawn 4× oversized and downsampled so it stays round at 16×16 (the Windows
small-icon size); a dark outline keeps it visible on light and dark taskbars alike.
Images are RGBA with a transparent background and are cached per (colour, size).
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw

from luna_daemon.tray.menu import COLOURS

# Fill colours. Far apart in hue *and* brightness so colour-blind users can still tell
# gray/yellow/green/red apart, and so tests can classify screenshot pixels robustly.
RGB = {
    "gray": (150, 150, 150),
    "yellow": (245, 190, 20),
    "green": (30, 185, 70),
    "red": (225, 35, 35),
}
OUTLINE = (25, 25, 25)
_SUPERSAMPLE = 4


@lru_cache(maxsize=32)
def disc(colour: str, size: int = 64) -> Image.Image:
    """An RGBA ``size``×``size`` disc in ``colour`` (one of ``menu.COLOURS``).

    The returned image is shared (cached): callers must not draw on it; copy first.
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
    big = size * _SUPERSAMPLE
    img = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    # Outline ~1/12 of the size but at least one final pixel, so it survives 16×16.
    outline = max(_SUPERSAMPLE, big // 12)
    margin = max(_SUPERSAMPLE // 2, big // 32)
    draw.ellipse((margin, margin, big - 1 - margin, big - 1 - margin), fill=OUTLINE + (255,))
    inner = margin + outline
    draw.ellipse((inner, inner, big - 1 - inner, big - 1 - inner), fill=RGB[colour] + (255,))
    return img.resize((size, size), Image.LANCZOS)


def classify(rgb: tuple[int, int, int], tolerance: int = 60) -> str | None:
    """The palette colour nearest to ``rgb`` if within ``tolerance`` (Euclidean), else None.

    Used by tests and the benchmark to read the icon back from a screenshot.
    """
    best, best_d = None, float("inf")
    for name, ref in RGB.items():
        d = sum((a - b) ** 2 for a, b in zip(rgb[:3], ref)) ** 0.5
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
