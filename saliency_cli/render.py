"""Heatmaps people can read: matplotlib colormaps blended over the part of the image the model saw, each with a
colour bar that says what its colours mean, and titled montages laid out as a grid.

Display only: the maps on disk (.npy) are never changed here.

- Unsigned maps (e.g. `abs-sum` reductions): colour index = clip(v / c, 0, 1) with c the `percentile`-th value
  of the map; the colormap (default inferno) is blended over the photo with constant opacity `alpha`.
- Signed maps (integrated gradients, SmoothTaylor, GGIG): a diverging colormap (default RdBu_r) centred on 0,
  colour index = 1/2 + sign(v) sqrt(clip(|v| / c, 0, 1)) / 2 with c the `percentile`-th value of |v|, blended
  over a grey copy of the photo with an opacity that grows with |v|. The square root and the grey base are
  what make a heavy-tailed, pixel-scale signed map visible: a linear colour ramp left almost every pixel at the
  pale centre of the colormap, i.e. the overlay looked blank.
- Every overlay carries a colour bar strip below the heatmap. Its sizes scale with the image width (a 256 px
  wide overlay gets 11 px text), so the overlay reads the same at any resolution and scaled into a montage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from saliency_cli.reduce import display_scale

DEFAULT_COLORMAP = "inferno"
DEFAULT_DIVERGING = "RdBu_r"
MONTAGE_COLUMNS = 4  # panels per montage row; more wrap into the next row
MONTAGE_WIDTH = 256  # width of one montage panel, px
INK = (30, 30, 30)
MUTED = (90, 90, 90)


def colormap(name: str):  # noqa: ANN201 - matplotlib's Colormap
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}") from None


@lru_cache(maxsize=32)
def font(px: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans at `px` pixels, from matplotlib's own data (so every machine draws the same glyphs, including
    the minus sign, sigma and the square root); Pillow's default font if that file is missing."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(str(path), px)
    except OSError:
        return ImageFont.load_default(px)


def number(v: float) -> str:
    """A compact label for a map value: `0`, `0.0312`, `12.5`, `1.2e-3`, with a true minus sign."""
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    a = abs(v)
    if 1e-2 <= a < 1e3:
        text = f"{a:.3g}"
    else:
        mantissa, exponent = f"{a:.1e}".split("e")
        text = f"{mantissa}e{int(exponent)}"
    return ("\u2212" if v < 0 else "") + text


def ordinal(p: float) -> str:
    """99 -> `99th`, 1 -> `1st`, 92.5 -> `92.5th`."""
    if p != int(p):
        return f"{p:g}th"
    n = int(p)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


@dataclass(frozen=True)
class Scale:
    """How a map's values became colours. `clip` (in the map's units) is drawn at full colour: the
    `percentile`-th value of |m|; values beyond it are clipped. Signed maps use a square-root ramp each side of 0."""

    clip: float
    signed: bool
    percentile: float
    cmap: str

    def index(self, m: np.ndarray) -> np.ndarray:
        """Colormap positions in [0, 1] of the values m (any shape)."""
        if self.clip <= 0:
            return np.full(m.shape, 0.5 if self.signed else 0.0)
        r = m / self.clip
        if self.signed:
            return 0.5 + 0.5 * np.sign(r) * np.sqrt(np.clip(np.abs(r), 0.0, 1.0))
        return np.clip(r, 0.0, 1.0)

    def ticks(self) -> list[tuple[float, str]]:
        """(position along the bar in [0, 1], label) of the bar's labelled values."""
        if self.signed:
            return [(0.0, number(-self.clip)), (0.5, "0"), (1.0, "+" + number(self.clip))]
        return [(0.0, "0"), (1.0, number(self.clip))]

    def caption(self) -> str:
        """One line saying what the bar's ends mean."""
        if self.clip <= 0:
            return "the map is zero everywhere"
        p = ordinal(self.percentile)
        if self.signed:
            return f"signed, \u221a scale; ends: \u00b1{p} pct of |value|"
        return f"right end: {p} percentile (clipped above)"


def map_scale(m: np.ndarray, percentile: float = 99.0, cmap: str | None = None) -> tuple[np.ndarray, Scale]:
    """The map as 2-D float64 and the Scale it is displayed with (`cmap` None: inferno, or RdBu_r if signed)."""
    m2, clip, signed = display_scale(m, percentile)
    name = cmap or (DEFAULT_DIVERGING if signed else DEFAULT_COLORMAP)
    colormap(name)  # an unknown name fails here, before anything is drawn
    return m2, Scale(clip, signed, percentile, name)


def heat(region: Image.Image, m: np.ndarray, *, cmap: str | None = None, alpha: float = 0.5,
         percentile: float = 99.0) -> tuple[Image.Image, Scale]:
    """The map resized to `region` (bilinear) and blended over it, without a colour bar: an RGB image of
    region's size, and the Scale used."""
    m2, scale = map_scale(m, percentile, cmap)
    resized = np.asarray(Image.fromarray(m2.astype(np.float32), mode="F").resize(region.size,
                                                                               Image.Resampling.BILINEAR))
    idx = scale.index(resized.astype(np.float64))
    colours = colormap(scale.cmap)(idx)[..., :3]
    if scale.signed:
        grey = np.asarray(region.convert("L"), dtype=np.float32)[..., None] / 255.0
        base = 0.3 + 0.55 * grey  # a grey photo: red and blue stay readable over any colour of the image
        strength = np.abs(idx - 0.5) * 2.0  # sqrt(|v| / clip), 0..1
        weight = min(1.0, 1.8 * alpha) * np.clip(1.5 * strength, 0.0, 1.0)[..., None]
    else:
        base = np.asarray(region.convert("RGB"), dtype=np.float32) / 255.0
        weight = np.full(resized.shape + (1,), alpha, dtype=np.float32)
    out = base * (1.0 - weight) + colours * weight
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB"), scale


def _unit(width: int) -> float:
    """The size unit of a colour bar strip for an image `width` px wide (1 at 256 px, at least 0.8)."""
    return max(width, 205) / 256.0


def colorbar(width: int, scale: Scale) -> Image.Image:
    """A strip `width` px wide: the colormap from end to end, tick labels, and a caption line (see Scale)."""
    u = _unit(width)
    pad, bar_h, tick = round(4 * u), round(11 * u), round(3 * u)
    f = font(max(9, round(11 * u)))
    line = round(f.size * 1.3) if isinstance(f, ImageFont.FreeTypeFont) else 13
    height = pad + bar_h + tick + 2 * line + pad // 2
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    x0, x1 = pad, max(pad + 2, width - pad)
    positions = np.linspace(0.0, 1.0, x1 - x0)
    if scale.signed:
        values = np.sign(positions * 2 - 1) * (positions * 2 - 1) ** 2 * scale.clip
    else:
        values = positions * scale.clip
    row = colormap(scale.cmap)(scale.index(values) if scale.clip > 0 else positions)[:, :3]
    bar = np.broadcast_to((row * 255 + 0.5).astype(np.uint8)[None], (bar_h, x1 - x0, 3))
    strip.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (x0, pad))
    draw = ImageDraw.Draw(strip)
    draw.rectangle((x0 - 1, pad - 1, x1, pad + bar_h), outline=MUTED)
    label_y = pad + bar_h + tick
    for pos, text in scale.ticks():
        x = x0 + pos * (x1 - x0 - 1)
        draw.line((x, pad + bar_h, x, label_y), fill=INK)
        w = draw.textlength(text, font=f)
        left = min(max(0.0, x - w / 2), width - w)
        draw.text((left, label_y), text, fill=INK, font=f)
    caption = fit(draw, scale.caption(), f, width - 2 * pad)
    draw.text((pad, label_y + line), caption, fill=MUTED, font=f)
    return strip


def fit(draw: ImageDraw.ImageDraw, text: str, f: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """`text` cut (with an ellipsis) so that it is at most `width` px wide in font f."""
    if draw.textlength(text, font=f) <= width:
        return text
    while text and draw.textlength(text + "\u2026", font=f) > width:
        text = text[:-1]
    return text + "\u2026"


def overlay(region: Image.Image, m: np.ndarray, *, cmap: str | None = None, alpha: float = 0.5,
            percentile: float = 99.0) -> Image.Image:
    """The heatmap over `region` at region's own resolution, with its colour bar strip below: an RGB image
    region.width wide and region.height + the strip's height tall (see `heat` and `colorbar`)."""
    image, scale = heat(region, m, cmap=cmap, alpha=alpha, percentile=percentile)
    bar = colorbar(image.width, scale)
    canvas = Image.new("RGB", (image.width, image.height + bar.height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    canvas.paste(bar, (0, image.height))
    return canvas


TITLE_KEY = "saliency-title-height"  # a PNG text chunk: the height of the title strip atop a single overlay


def with_title(image: Image.Image, lines: list[str]) -> Image.Image:
    """`image` under a white strip holding its title lines (the first in bold), each wrapped to the image's width
    in at most two lines: what a single overlay shows of its image, class and method (montages have theirs)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fonts = [(font(12, bold=True), 16, INK), (font(11), 14, MUTED)]
    wrapped = [(_wrap(probe, line, f, image.width - 8, 2), f, step, ink)
               for line, (f, step, ink) in zip(lines, fonts, strict=False)]
    height = 8 + sum(len(rows) * step for rows, _, step, _ in wrapped)
    canvas = Image.new("RGB", (image.width, image.height + height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 4
    for rows, f, step, ink in wrapped:
        for row in rows:
            draw.text((4, y), row, fill=ink, font=f)
            y += step
    canvas.paste(image, (0, height))
    return canvas


def without_title(image: Image.Image) -> Image.Image:
    """An overlay read back from its PNG without its title strip (files without one are returned as they are)."""
    height = int(image.info.get(TITLE_KEY, 0) or 0)
    return image.crop((0, height, image.width, image.height)) if 0 < height < image.height else image


def overlay_title(key: str, record: dict[str, Any], tag: str, *, topk: bool) -> list[str]:
    """A single overlay's title lines: the image, the explained class (name, index, probability); the method
    with its settings."""
    first = montage_title(key, record, seed=0, score="", topk=topk)[0]
    return [first, f"{tag}  {settings_text(record.get('params'))}".strip()]


def colorbar_height(width: int) -> int:
    """The height of the colour bar strip `overlay` adds below a heatmap `width` px wide."""
    return colorbar(width, Scale(1.0, False, 99.0, DEFAULT_COLORMAP)).height


def _wrap(draw: ImageDraw.ImageDraw, text: str, f: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float,
          lines: int) -> list[str]:
    """`text` (explicit newlines kept) broken at spaces into at most `lines` lines of at most `width` px."""
    out: list[str] = []
    for para in text.split("\n"):
        current = ""
        for word in para.split(" "):
            trial = f"{current} {word}".strip()
            if current and draw.textlength(trial, font=f) > width:
                out.append(current)
                current = word
            else:
                current = trial
        out.append(current)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = fit(draw, out[-1] + " \u2026", f, width)
    return [fit(draw, line, f, width) for line in out]


def montage(panels: list[tuple[str, Image.Image]], title: list[str] | str | None = None, *,
            columns: int = MONTAGE_COLUMNS, width: int = MONTAGE_WIDTH) -> Image.Image:
    """Captioned panels in a grid of at most `columns` per row, each scaled to `width` px wide, under title
    lines (the first in bold). Captions take up to four lines; a newline in a caption starts its second line."""
    titles = [title] if isinstance(title, str) else list(title or [])
    columns = max(1, min(columns, len(panels)))
    cap_font, title_font, sub_font = font(12), font(15, bold=True), font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    gap, margin, cap_line = 8, 10, 15
    cap_lines = 4
    scaled = [(cap, img.convert("RGB").resize((width, max(1, round(img.height * width / img.width))),
                                               Image.Resampling.LANCZOS)) for cap, img in panels]
    rows = [scaled[i:i + columns] for i in range(0, len(scaled), columns)]
    total_w = 2 * margin + columns * width + (columns - 1) * gap
    title_lines = [(_wrap(probe, t, title_font if i == 0 else sub_font, total_w - 2 * margin, 2), i == 0)
                   for i, t in enumerate(titles)]
    title_h = sum(len(lines) * (19 if bold else 16) for lines, bold in title_lines) + (6 if titles else 0)
    row_h = [cap_lines * cap_line + 2 + max(img.height for _, img in row) for row in rows]
    total_h = 2 * margin + title_h + sum(row_h) + gap * (len(rows) - 1)
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = margin
    for lines, bold in title_lines:
        for line in lines:
            draw.text((margin, y), line, fill=INK if bold else MUTED, font=title_font if bold else sub_font)
            y += 19 if bold else 16
    y += 6 if titles else 0
    for row, h in zip(rows, row_h, strict=True):
        for j, (cap, img) in enumerate(row):
            x = margin + j * (width + gap)
            for k, line in enumerate(_wrap(draw, cap, cap_font, width, cap_lines)):
                draw.text((x, y + k * cap_line), line, fill=INK if k == 0 else MUTED, font=cap_font)
            canvas.paste(img, (x, y + cap_lines * cap_line + 2))
        y += h + gap
    return canvas


def strip(panels: list[tuple[str, Image.Image]], height: int = 256,
          title: list[str] | str | None = None) -> Image.Image:
    """Captioned panels (e.g. the model's input crop and one overlay per method) as a `montage` grid; `height`
    is kept for callers of the older one-row strip and sets the panel width."""
    return montage(panels, title, width=height)


HIDDEN_PARAMS = ("seed", "score")  # run-wide settings, said once in a montage's title


def settings_text(params: dict[str, Any] | None) -> str:
    """A record's hyper-parameters as `samples=10 noise=0.15 \u03c3=0.392` (sigma: the absolute noise std in model
    input units); the run-wide seed and score are left out."""
    params = params or {}
    hidden = {*HIDDEN_PARAMS, "sigma", "noise_absolute"} | ({"noise_relative"} if "noise" in params else set())
    items = [(k, v) for k, v in params.items() if k not in hidden and v is not None]
    items.sort(key=lambda kv: kv[0] == "reduce")  # the method's own settings first, in its order
    parts = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in items]
    sigma = params.get("sigma", params.get("noise_absolute"))
    if isinstance(sigma, int | float):  # next to the relative noise level it comes from
        at = next((i + 1 for i, (k, _) in enumerate(items) if k == "noise"), len(parts))
        parts.insert(at, f"\u03c3={sigma:.3g}")
    return " ".join(parts)


def montage_title(key: str, record: dict[str, Any] | None, *, seed: int, score: str, topk: bool) -> list[str]:
    """A montage's title lines: the image, the explained class (name, index, probability), and the run's
    settings that every panel shares."""
    rec = record or {}
    what = "class" if topk else "predicted"
    line = key
    if rec.get("target") is not None:
        line += f": {what} {rec.get('label') or ''} ({rec['target']})".replace("  ", " ")
    if isinstance(rec.get("score"), int | float):
        line += f", p = {rec['score']:.3f}"
    return [line, f"maps of the {score}, seed {seed}; each panel has its own colour scale (the bar below it)"]


def input_caption(region: Image.Image) -> str:
    """The caption of a montage's first panel: what the model saw."""
    return f"model input: the crop it saw\n({region.width}\u00d7{region.height} px of the original image)"


REGION_COLOURS = {"neither": (236, 236, 236), "a": (52, 120, 230), "b": (240, 150, 20), "both": (110, 30, 130)}


def regions(a: np.ndarray, b: np.ndarray, width: int) -> Image.Image:
    """Two boolean masks of the same (H, W) shape drawn as one picture `width` px wide (nearest-neighbour):
    only in a (blue), only in b (orange), in both (purple), in neither (light grey); see REGION_COLOURS."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    rgb = np.empty(a.shape + (3,), dtype=np.uint8)
    rgb[...] = REGION_COLOURS["neither"]
    rgb[a & ~b] = REGION_COLOURS["a"]
    rgb[b & ~a] = REGION_COLOURS["b"]
    rgb[a & b] = REGION_COLOURS["both"]
    height = max(1, round(a.shape[0] * width / a.shape[1]))
    return Image.fromarray(rgb, "RGB").resize((width, height), Image.Resampling.NEAREST)
