"""Legible images: every overlay carries a colour bar whose ends are the colormap's ends, signed maps are
visible, montages are titled grids. Display only: no model, no torch maths."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from saliency_cli.render import (
    DEFAULT_COLORMAP,
    DEFAULT_DIVERGING,
    colorbar,
    colorbar_height,
    heat,
    map_scale,
    montage,
    number,
    overlay,
    settings_text,
)


def _photo(w: int = 240, h: int = 200) -> Image.Image:
    """A smooth colourful test picture (w x h)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x / w, y / h, 0.5 + 0.4 * np.sin(x / 17.0)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8), "RGB")


def _png_roundtrip(img: Image.Image) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(int)


def _bar_row(png: np.ndarray, heat_height: int) -> np.ndarray:
    """The colour bar's middle pixel row, (W, 3): the bar starts a few pixels below the heatmap."""
    strip = png[heat_height:]
    # the bar is the band of rows where most pixels are not white
    coloured = [(strip[y] != 255).any(-1).mean() for y in range(strip.shape[0])]
    rows = [y for y, frac in enumerate(coloured) if frac > 0.8]
    return strip[rows[len(rows) // 2]]


def _ends(row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First, middle and last pixel inside the bar's 1 px outline."""
    inside = np.nonzero((row != 255).any(-1))[0]
    left, right = inside[0] + 1, inside[-1] - 1
    return row[left], row[(left + right) // 2], row[right]


def _cmap_rgb(name: str, pos: float) -> np.ndarray:
    return np.round(np.array(matplotlib.colormaps[name](pos)[:3]) * 255)


def test_unsigned_overlay_bar_ends_are_the_colormap_ends():
    """A linear ramp (unsigned): the PNG's colour bar runs from inferno(0) to inferno(1), below the heatmap."""
    region = _photo()
    ramp = np.tile(np.linspace(0.0, 2.0, 64, dtype=np.float32), (48, 1))
    img = overlay(region, ramp)
    assert img.width == region.width and img.height == region.height + colorbar_height(region.width)
    png = _png_roundtrip(img)
    first, _, last = _ends(_bar_row(png, region.height))
    assert np.abs(first - _cmap_rgb(DEFAULT_COLORMAP, 0.0)).max() <= 2
    assert np.abs(last - _cmap_rgb(DEFAULT_COLORMAP, 1.0)).max() <= 2


def test_signed_overlay_bar_is_diverging_and_centred_on_zero():
    """A signed ramp: RdBu_r from end to end, its centre colour in the middle of the bar; labels say -x, 0, +x."""
    region = _photo()
    ramp = np.tile(np.linspace(-1.0, 1.0, 64, dtype=np.float32), (48, 1))
    png = _png_roundtrip(overlay(region, ramp))
    first, middle, last = _ends(_bar_row(png, region.height))
    assert np.abs(first - _cmap_rgb(DEFAULT_DIVERGING, 0.0)).max() <= 2
    assert np.abs(last - _cmap_rgb(DEFAULT_DIVERGING, 1.0)).max() <= 2
    assert np.abs(middle - _cmap_rgb(DEFAULT_DIVERGING, 0.5)).max() <= 25  # a pixel either side of the centre
    _, scale = map_scale(ramp)
    clip = float(np.percentile(np.abs(ramp), 99))
    assert scale.signed and scale.clip == pytest.approx(clip)
    labels = [text for _, text in scale.ticks()]
    assert labels == [number(-clip), "0", "+" + number(clip)] and labels[0].startswith("\u2212")
    assert "99th" in scale.caption()


def test_a_custom_colormap_is_the_bar_too():
    region = _photo(120, 120)
    ramp = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (32, 1))
    png = _png_roundtrip(overlay(region, ramp, cmap="viridis"))
    first, _, last = _ends(_bar_row(png, region.height))
    assert np.abs(first - _cmap_rgb("viridis", 0.0)).max() <= 2
    assert np.abs(last - _cmap_rgb("viridis", 1.0)).max() <= 2


def test_a_heavy_tailed_signed_map_is_visible():
    """Pixel-scale signed noise with a heavy tail like integrated gradients' (median |m| about 6 % of the 99th
    percentile): a good part of the heatmap is visibly red or blue. The linear colour ramp of before tinted
    16 % of the pixels of this map (21 % of the real IG map on the cat); the square-root ramp tints 46 %."""
    region = Image.new("RGB", (224, 224), (128, 128, 128))
    rng = np.random.default_rng(0)
    laplace = rng.laplace(size=(224, 224))
    m = (np.sign(laplace) * np.abs(laplace) ** 1.5).astype(np.float32)
    img, scale = heat(region, m)
    assert scale.signed
    px = np.asarray(img).astype(int)
    tinted = np.abs(px[..., 0] - px[..., 2]) > 20  # red or blue, not grey
    assert tinted.mean() > 0.3, tinted.mean()


def test_an_all_zero_map_has_a_bar_that_says_so():
    bar = colorbar(200, map_scale(np.zeros((8, 8)))[1])
    assert bar.width == 200 and bar.height == colorbar_height(200)
    assert map_scale(np.zeros((8, 8)))[1].caption() == "the map is zero everywhere"


def test_number_labels():
    assert [number(v) for v in (0.0, 0.0312, 12.5, 0.0012, -3e-5, 25000.0)] == [
        "0", "0.0312", "12.5", "1.2e-3", "\u22123.0e-5", "2.5e4"]


def test_montage_wraps_into_a_titled_grid_of_at_most_four_columns():
    """Nine panels: three rows of at most four 256 px columns, not one 2,300 px row; the title is drawn."""
    panel = overlay(_photo(300, 300), np.ones((16, 16), dtype=np.float32))
    panels = [("model input: the crop it saw", _photo(300, 300))] + [(f"method{i}\nsamples=10", panel)
                                                                     for i in range(8)]
    out = montage(panels, ["cat.png: predicted tabby (281), p = 0.433", "maps of the logit"])
    assert out.width < 4 * 256 + 100
    assert out.height > 3 * 256
    top = np.asarray(out)[:30]
    assert (top < 100).any()  # dark title text on white


def test_settings_text_names_the_method_settings_and_absolute_sigma():
    text = settings_text({"samples": 10, "noise": 0.15, "seed": 0, "reduce": "abs-sum", "score": "logit",
                          "sigma": 0.6931})
    assert text == "samples=10 noise=0.15 \u03c3=0.693 reduce=abs-sum"
