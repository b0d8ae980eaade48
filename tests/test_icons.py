"""The Luna mark on real rendered pixels: crisp at panel sizes, states that read without
colour, legible on light and dark panels, and the favicon drawn from the same geometry."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from luna_daemon.tray import icons
from luna_daemon.tray.menu import COLOURS

ROOT = Path(__file__).resolve().parents[1]
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
PANEL = (64, 64, 64)  # the e2e trayer tint


def over(img: Image.Image, bg: tuple[int, int, int]) -> Image.Image:
    """``img`` composited onto a solid panel colour, as a panel shows it."""
    base = Image.new("RGBA", img.size, bg + (255,))
    return Image.alpha_composite(base, img.convert("RGBA")).convert("RGB")


def luminance(rgb) -> np.ndarray:
    """WCAG relative luminance of an (..., 3) uint8 array."""
    c = np.asarray(rgb, dtype=float) / 255
    c = np.where(c <= 0.03928, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return c @ np.array([0.2126, 0.7152, 0.0722])


def contrast(a, b) -> np.ndarray:
    la, lb = luminance(a), luminance(b)
    return (np.maximum(la, lb) + 0.05) / (np.minimum(la, lb) + 0.05)


def glyph_mask(img: Image.Image, bg) -> np.ndarray:
    """The light pixels of the grayscale image in the glyph region (the dark side's box).

    The region is taken from the geometry (the shadow disc), the pixels from the render.
    """
    size = img.size[0]
    shadow = icons.shapes("gray", size)[2]
    x0, y0 = int(shadow.cx - shadow.r), int(shadow.cy - shadow.r)
    gray = np.asarray(over(img, bg).convert("L"), dtype=int)
    light = (gray > 200) & (np.asarray(img)[..., 3] == 255)  # a white panel is no glyph
    return light[max(0, y0):, max(0, x0):]


@pytest.mark.parametrize("size", icons.SIZES)
@pytest.mark.parametrize("colour", COLOURS)
def test_each_size_is_rendered_natively_with_hard_edges(colour, size):
    img = icons.mark(colour, size)
    assert img.size == (size, size) and img.mode == "RGBA"
    px = np.asarray(img)
    alpha = px[..., 3]
    semi = np.count_nonzero((alpha > 0) & (alpha < 255))
    assert semi <= 0.02 * size * size, f"{semi} semi-transparent pixels at {size}px: edges would blur"
    opaque = px[alpha == 255][:, :3]
    allowed = {icons.OUTLINE, icons.GLYPH, icons.RGB[colour]}
    assert {tuple(int(v) for v in p) for p in opaque} <= allowed, "blended colours: a downscaled image"
    # a round mark: transparent corners, most of the disc opaque
    assert alpha[0, 0] == alpha[-1, -1] == alpha[0, -1] == alpha[-1, 0] == 0
    assert 0.7 < np.count_nonzero(alpha == 255) / (size * size) < 0.85
    assert icons.dominant_colour(img, min_pixels=size * size // 10) == colour


@pytest.mark.parametrize("size", icons.SIZES)
def test_the_state_colour_is_a_crescent(size):
    # A crescent is concave: the centroid of its pixels lies outside it (a disc's does not).
    for colour in COLOURS:
        px = np.asarray(icons.mark(colour, size))
        lit = np.all(px[..., :3] == icons.RGB[colour], axis=-1) & (px[..., 3] == 255)
        ys, xs = np.nonzero(lit)
        assert len(ys) >= size * size // 8
        cy, cx = round(ys.mean()), round(xs.mean())
        assert not lit[cy, cx], f"{colour} at {size}px: the lit part is not a crescent"


@pytest.mark.parametrize("bg", [WHITE, BLACK, PANEL], ids=["white", "black", "panel"])
@pytest.mark.parametrize("size", icons.SIZES)
def test_states_read_without_colour(size, bg):
    masks = {c: glyph_mask(icons.mark(c, size), bg) for c in COLOURS}
    for c, m in masks.items():
        assert m.sum() >= 6, f"{c} at {size}px: no glyph"
    for a, b in itertools.combinations(COLOURS, 2):
        inter = np.count_nonzero(masks[a] & masks[b])
        union = np.count_nonzero(masks[a] | masks[b])
        assert inter / union < 0.5, f"{a} and {b} glyphs overlap {inter / union:.2f} at {size}px in grayscale"


@pytest.mark.parametrize("size", [20, 24, 28, 32])
def test_a_panel_scaled_icon_is_still_told_apart_in_grayscale(size):
    # What GTK does with the 64 px tray image: scale it (bilinear) to the panel's size.
    # Each scaled state, in grayscale, must be nearest to its own native render.
    native = {c: np.asarray(over(icons.mark(c, size), PANEL).convert("L"), dtype=float) for c in COLOURS}
    for c in COLOURS:
        scaled = icons.mark(c, 64).resize((size, size), Image.BILINEAR)
        gray = np.asarray(over(scaled, PANEL).convert("L"), dtype=float)
        dist = {k: np.abs(gray - v).mean() for k, v in native.items()}
        assert min(dist, key=dist.get) == c, dist
        assert icons.dominant_colour(over(scaled, PANEL)) == c


@pytest.mark.parametrize("size", icons.SIZES)
@pytest.mark.parametrize("colour", COLOURS)
def test_legible_on_light_and_dark_panels(colour, size):
    img = icons.mark(colour, size)
    px = np.asarray(img)
    opaque = px[..., 3] == 255
    padded = np.pad(opaque, 1)
    edge = opaque & ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    lit = opaque & np.all(px[..., :3] == icons.RGB[colour], axis=-1)
    glyph = opaque & np.all(px[..., :3] == icons.GLYPH, axis=-1)
    # Light panel: the dark rim outlines the whole mark, even a pale yellow crescent.
    white = np.asarray(over(img, WHITE))
    assert np.mean(contrast(white[edge], WHITE) >= 3) >= 0.95
    assert not np.any(lit & edge), "the crescent touches the panel without an outline"
    # Dark panel: the rim vanishes, so the crescent and the glyph must carry the mark.
    black = np.asarray(over(img, BLACK))
    assert np.all(contrast(black[lit], BLACK) >= 4), f"{colour} crescent too dark for a dark panel"
    assert np.all(contrast(black[glyph], BLACK) >= 7)
    # On both: the glyph stands out from the dark side it sits on.
    assert np.all(contrast(px[glyph][:, :3], icons.OUTLINE) >= 7)


def test_unknown_colours_are_rejected_and_the_brand_mark_has_no_glyph():
    with pytest.raises(ValueError, match="unknown colour"):
        icons.mark("blue", 16)
    with pytest.raises(ValueError):
        icons.svg("blue")
    brand = np.asarray(icons.mark(icons.BRAND, 32))
    assert not np.any(np.all(brand[..., :3] == icons.GLYPH, axis=-1) & (brand[..., 3] == 255))
    assert icons.dominant_colour(icons.mark(icons.BRAND, 32)) is None  # not a state colour


def _parse_svg(text: str) -> list:
    ns = "{http://www.w3.org/2000/svg}"
    root = ET.fromstring(text)
    assert root.tag == ns + "svg"
    out = []
    for el in root:
        a = {k: float(v) if k not in ("fill", "stroke", "points", "stroke-linecap", "stroke-linejoin") else v
             for k, v in el.attrib.items()}
        if el.tag == ns + "circle":
            out.append(("circle", a["cx"], a["cy"], a["r"], a["fill"]))
        elif el.tag == ns + "rect":
            out.append(("rect", a["x"], a["y"], a["x"] + a["width"], a["y"] + a["height"], a["fill"]))
        else:
            assert el.tag == ns + "polyline" and a["stroke-linecap"] == a["stroke-linejoin"] == "round"
            pts = tuple(tuple(float(v) for v in p.split(",")) for p in a["points"].split())
            out.append(("stroke", pts, a["stroke-width"], a["stroke"]))
    return out


def _flat(values) -> list[float]:
    return [float(v) for v in np.hstack([np.ravel(v) for v in values])]


def _hex(paint: str) -> str:
    return "#{:02x}{:02x}{:02x}".format(*icons._rgb(paint))


@pytest.mark.parametrize("colour", [*COLOURS, icons.BRAND])
def test_the_svg_draws_the_same_primitives_as_the_tray_icon(colour):
    parsed = _parse_svg(icons.svg(colour, 32))
    expected = []
    for sh in icons.shapes(colour, 32):
        if isinstance(sh, icons.Circle):
            expected.append(("circle", sh.cx, sh.cy, sh.r, _hex(sh.paint)))
        elif isinstance(sh, icons.Rect):
            expected.append(("rect", sh.x0, sh.y0, sh.x1, sh.y1, _hex(sh.paint)))
        else:
            expected.append(("stroke", sh.points, sh.width, _hex(sh.paint)))
    assert len(parsed) == len(expected)
    for p, e in zip(parsed, expected):
        assert p[0] == e[0] and p[-1] == e[-1]
        assert np.allclose(_flat(p[1:-1]), _flat(e[1:-1]), atol=1e-3), (p, e)


def test_favicon_files_are_generated_from_the_geometry():
    # Regenerate with: python -m luna_daemon.tray.icons
    files = icons.generated_files()
    assert icons.STATIC / "favicon.svg" in files
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path.name} is stale: run python -m luna_daemon.tray.icons"
    html = (icons.STATIC / "index.html").read_text()
    assert 'href="/static/favicon.svg"' in html and 'type="image/svg+xml"' in html
    registry_icon = Image.open(ROOT / "docs" / "icon.png")
    assert registry_icon.size == (256, 256)
    assert np.array_equal(np.asarray(registry_icon.convert("RGBA")), np.asarray(icons.mark("green", 256)))


def test_screen_pixels_classify_back_to_the_state_colour():
    for c in COLOURS:
        assert icons.classify(icons.RGB[c], tolerance=0) == c
    # The dark side, the glyph and the panels never read as a state.
    for rgb in (icons.OUTLINE, icons.GLYPH, icons.BRAND_RGB, WHITE, BLACK, PANEL):
        assert icons.classify(rgb, tolerance=45) is None


@pytest.mark.parametrize("size", [18, 24, 30])
def test_the_e2e_glyph_reader_tells_states_apart_without_colour(size):
    from tray_helpers import glyph_state

    for c in COLOURS:
        # A panel grab: the 64 px tray image scaled by the panel, off-centre in a wider strip.
        strip = Image.new("RGBA", (size + 20, size + 8), PANEL + (255,))
        strip.alpha_composite(icons.mark(c, 64).resize((size, size), Image.BILINEAR), (7, 3))
        assert glyph_state(strip.convert("RGB")) == c
        # The same grab with the colour taken away still reads.
        assert glyph_state(strip.convert("L").convert("RGB")) == c
    assert glyph_state(Image.new("RGB", (40, 40), PANEL)) is None
    # The old icon -- a disc told apart by colour only -- reads as no state at all.
    for c in COLOURS:
        disc = Image.new("RGB", (size + 20, size + 8), PANEL)
        ImageDraw.Draw(disc).ellipse((7, 3, 7 + size, 3 + size), fill=icons.RGB[c], outline=icons.OUTLINE, width=2)
        assert glyph_state(disc) is None
