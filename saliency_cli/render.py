"""Heatmaps and overlays: matplotlib colormaps blended over the part of the image the model saw."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from saliency_cli.reduce import display_map

DEFAULT_COLORMAP = "inferno"
DEFAULT_DIVERGING = "RdBu_r"


def colormap(name: str):  # noqa: ANN201 - matplotlib's Colormap
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}") from None


def overlay(region: Image.Image, m: np.ndarray, *, cmap: str | None = None, alpha: float = 0.5,
            percentile: float = 99.0) -> Image.Image:
    """The map resized to `region` (bilinear), coloured and blended over it: an RGB image of region's size.

    Unsigned maps use `cmap` (default inferno) blended with constant `alpha`. Signed maps use a diverging
    colormap (default RdBu_r) centred on zero, blended with weight alpha * |value| so zero leaves the photo.
    """
    scaled, signed = display_map(m, percentile)
    resized = np.asarray(
        Image.fromarray(scaled.astype(np.float32), mode="F").resize(region.size, Image.Resampling.BILINEAR)
    )
    base = np.asarray(region.convert("RGB"), dtype=np.float32) / 255.0
    if signed:
        colours = colormap(cmap or DEFAULT_DIVERGING)((resized + 1.0) / 2.0)[..., :3]
        # sqrt: signed maps (IG, SmoothTaylor) are heavy-tailed; a linear fade hid all but a few pixels
        weight = min(1.0, 1.6 * alpha) * np.sqrt(np.abs(resized))[..., None]
    else:
        colours = colormap(cmap or DEFAULT_COLORMAP)(resized)[..., :3]
        weight = np.full(resized.shape + (1,), alpha, dtype=np.float32)
    out = base * (1.0 - weight) + colours * weight
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def strip(panels: list[tuple[str, Image.Image]], height: int = 256) -> Image.Image:
    """Labelled panels side by side (each scaled to `height`), e.g. the original and one overlay per method."""
    font = ImageFont.load_default()
    label_h = 18
    scaled = []
    for label, img in panels:
        w = max(1, round(img.width * height / img.height))
        scaled.append((label, img.convert("RGB").resize((w, height), Image.Resampling.BILINEAR)))
    total_w = sum(img.width for _, img in scaled) + 4 * (len(scaled) - 1)
    canvas = Image.new("RGB", (total_w, height + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, img in scaled:
        canvas.paste(img, (x, label_h))
        draw.text((x + 3, 3), label[: max(4, img.width // 6)], fill=(0, 0, 0), font=font)
        x += img.width + 4
    return canvas
