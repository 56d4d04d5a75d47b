"""Localisation: does the map point at the object? Needs object regions from `--boxes FILE` or `--masks DIR`.

- `pointing` (Zhang et al. 2016, pointing game): 1 when the map's maximum lies inside the object.
- `energy` (Wang et al. 2020, Score-CAM's energy-based pointing game): the share of positive attribution
  inside the object; negative values are clamped to 0 first, so on a signed map (`--reduce sum`, GGIG,
  IG) the negative evidence is ignored.
- `energy-signed`: the signed variant, sum of the map inside the object over the sum of |map| everywhere, in
  [-1, 1]: negative attribution inside the object counts against it, negative attribution outside does not
  count for it. On a non-negative map it equals `energy`.

Regions are given in original-image pixels and brought into the map's frame (the model's input: resize and
crop, `crop_box` of the manifest) by sampling every map pixel's centre.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from saliency_cli.errors import UsageError
from saliency_cli.metrics.base import Batch, Scores, register

Box = tuple[float, float, float, float]
MASK_SUFFIXES = {".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".webp", ".npy"}


@register("pointing", summary="1 if the map's maximum falls inside the object (pointing game)",
          paper="Zhang et al. 2016, Top-down Neural Attention by Excitation Backprop, arXiv:1608.00507",
          higher_is_better=True, defaults={}, cost=lambda o: 0, needs_regions=True)
def pointing(batch: Batch) -> Scores:
    """The share of the map's maximisers that lie inside the region: 1 or 0 for a unique maximum; with ties
    (e.g. a map that is constant on the object) the fraction of tied maximisers inside, so a constant map
    scores the object's area fraction, the chance level. NaN for rows without a region. (R,)"""
    regions, has = _regions(batch)
    m = batch.maps.float()
    top = m.flatten(1).amax(1).view(-1, 1, 1)
    at_max = (m == top).flatten(1).float()  # (R, N)
    inside = (at_max * regions.flatten(1).float()).sum(1)
    value = inside / at_max.sum(1).clamp(min=1)
    return Scores(torch.where(has, value, torch.full_like(value, float("nan"))))


@register("energy", summary="Share of the positive attribution inside the object (energy pointing game); "
          "negative values are clamped to 0 before the ratio (see energy-signed)",
          paper="Wang et al. 2020, Score-CAM, arXiv:1910.01279", higher_is_better=True, defaults={},
          cost=lambda o: 0, needs_regions=True)
def energy(batch: Batch) -> Scores:
    """sum_{p in region} max(m_p, 0) / sum_p max(m_p, 0), in [0, 1]; NaN for rows without a region or with no
    positive attribution. Negative values are clamped to 0 before the ratio. (R,)"""
    regions, has = _regions(batch)
    pos = batch.maps.float().clamp(min=0).flatten(1)
    total = pos.sum(1)
    inside = (pos * regions.flatten(1).float()).sum(1)
    value = inside / total.clamp(min=1e-30)
    return Scores(torch.where(has & (total > 0), value, torch.full_like(value, float("nan"))))


@register("energy-signed", summary="Signed energy: sum of the map inside the object over the sum of |map|, in "
          "[-1, 1] (negative attribution inside counts against)",
          paper="Wang et al. 2020, Score-CAM, arXiv:1910.01279 (signed variant)", higher_is_better=True,
          defaults={}, cost=lambda o: 0, needs_regions=True)
def energy_signed(batch: Batch) -> Scores:
    """sum_{p in region} m_p / sum_p |m_p|, in [-1, 1]; equal to `energy` on a non-negative map; NaN for rows
    without a region or with an all-zero map. (R,)"""
    regions, has = _regions(batch)
    m = batch.maps.float().flatten(1)
    total = m.abs().sum(1)
    inside = (m * regions.flatten(1).float()).sum(1)
    value = inside / total.clamp(min=1e-30)
    return Scores(torch.where(has & (total > 0), value, torch.full_like(value, float("nan"))))


def _regions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.regions is None or batch.has_region is None:
        r = len(batch)
        return (torch.zeros_like(batch.maps, dtype=torch.bool),
                torch.zeros(r, dtype=torch.bool, device=batch.device))
    return batch.regions, batch.has_region


# -- regions from files -----------------------------------------------------------------------------------
def _box(values: Any, where: str) -> Box:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UsageError(f"--boxes: {where}: expected [left, top, right, bottom] numbers") from None
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise UsageError(f"--boxes: {where}: expected [left, top, right, bottom] with right > left, bottom > top")
    return box  # type: ignore[return-value]


def read_boxes(path: str | Path) -> dict[str, list[Box]]:
    """Object boxes by image name, from JSON or CSV, in original-image pixels [left, top, right, bottom].

    JSON: `{"image": [l, t, r, b]}` or `{"image": [[l, t, r, b], ...]}` (several boxes: their union), or a list
    of `{"image": ..., "box": [...]}` / `{"image": ..., "boxes": [[...], ...]}`. CSV: rows `image, left, top,
    right, bottom`, with or without that header; several rows of one image are a union. An image may be named
    by its path as given to `explain`, its absolute path, its key (path in the run folder) or its file name
    (`lookup`); names are kept normalised (`./a//b.png` is `a/b.png`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--boxes {path}: {e.strerror or e}") from None
    out: dict[str, list[Box]] = {}
    if p.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--boxes {path}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            for name, value in data.items():
                many = value if value and isinstance(value[0], list | tuple) else [value]
                out.setdefault(str(name), []).extend(_box(b, str(name)) for b in many)
        elif isinstance(data, list):
            for i, entry in enumerate(data):
                if not isinstance(entry, dict) or "image" not in entry or not ({"box", "boxes"} & set(entry)):
                    raise UsageError(f"--boxes {path}: entry {i} needs 'image' and 'box' (or 'boxes')")
                many = entry.get("boxes") or [entry["box"]]
                out.setdefault(str(entry["image"]), []).extend(_box(b, str(entry["image"])) for b in many)
        else:
            raise UsageError(f"--boxes {path}: expected a JSON object or list")
        return _normalised(out)
    for n, row in enumerate(csv.reader(text.splitlines())):
        if not row or not "".join(row).strip():
            continue
        if n == 0 and row[0].strip().lower() in ("image", "file", "path", "name"):
            continue
        if len(row) != 5:
            raise UsageError(f"--boxes {path}: line {n + 1}: expected image, left, top, right, bottom")
        out.setdefault(row[0].strip(), []).append(_box(row[1:], f"line {n + 1}"))
    return _normalised(out)


def _normalised(boxes: dict[str, list[Box]]) -> dict[str, list[Box]]:
    out: dict[str, list[Box]] = {}
    for name, value in boxes.items():
        out.setdefault(os.path.normpath(name) if name else name, []).extend(value)
    return out


def index_masks(folder: str | Path) -> dict[str, Path]:
    """Mask files under `folder` by every name an image may match: path relative to the folder with and
    without its suffix, and file name with and without suffix (first found wins for the short names)."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--masks {folder}: not a folder")
    index: dict[str, Path] = {}
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in MASK_SUFFIXES)
    for f in files:
        rel = f.relative_to(root).as_posix()
        for name in (rel, rel.rsplit(".", 1)[0]):
            index[name] = f
    for f in files:
        for name in (f.name, f.stem):
            index.setdefault(name, f)
    return index


def names_of(image: str, key: str, given: str | None = None) -> list[str]:
    """The names a region file may use for one image, most specific first: the path as given to explain
    (`given`, e.g. `sample_images/rocket.jpg`), the absolute path (`image`), the key (path in the run folder)
    with and without its suffix, the file name with and without its suffix."""
    paths = [given, os.path.normpath(given)] if given else []
    paths += [image, os.path.normpath(image), os.path.normpath(os.path.abspath(image))]
    out = [*paths, key, key.rsplit(".", 1)[0], Path(image).name, Path(image).stem]
    return list(dict.fromkeys(out))


def lookup(table: dict[str, Any], image: str, key: str, ambiguous: set[str], given: str | None = None) -> Any:
    """The entry of `table` for an image, trying names_of(); a bare file name shared by several images of the
    evaluation (in `ambiguous`) is refused."""
    paths = {n for p in (image, given) if p for n in (p, os.path.normpath(p))}
    for name in names_of(image, key, given):
        if name in table:
            if name in ambiguous and name not in paths and name != key:
                raise UsageError(f"the region file names {name!r}, but several images have that name; "
                                 "name them by their path as given to explain")
            return table[name]
    return None


def box_region(boxes: list[Box], crop_box: list[float], shape: tuple[int, int]) -> np.ndarray:
    """The union of boxes (original pixels) as a (H, W) bool mask in the map's frame: map pixel (i, j)
    covers original x in crop_box's [left, right) split into W columns; it is inside when its centre is."""
    h, w = shape
    left, top, right, bottom = crop_box
    cx = left + (np.arange(w) + 0.5) * (right - left) / w  # (W,) original x of column centres
    cy = top + (np.arange(h) + 0.5) * (bottom - top) / h
    out = np.zeros((h, w), dtype=bool)
    for bl, bt, br, bb in boxes:
        out |= ((cy >= bt) & (cy < bb))[:, None] & ((cx >= bl) & (cx < br))[None, :]
    return out


def mask_region(path: Path, image_size: tuple[int, int], crop_box: list[float], shape: tuple[int, int]) -> np.ndarray:
    """A mask file (image: non-zero = object; or a .npy array) as a (H, W) bool mask in the map's frame. The
    mask is read in original-image pixels (a mask of another size is scaled to the image first); map pixel
    centres sample it, nearest neighbour; outside the image is background."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 3:
            arr = arr.any(axis=-1) if arr.shape[-1] <= 4 else arr.any(axis=0)
        mask = arr.astype(bool)
    else:
        try:
            with Image.open(path) as im:
                mask = np.asarray(im.convert("L")) > 0
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise UsageError(f"--masks: cannot read {path} ({type(e).__name__})") from None
    if mask.ndim != 2:
        raise UsageError(f"--masks: {path} is not a 2-D mask")
    mh, mw = mask.shape
    iw, ih = image_size
    h, w = shape
    left, top, right, bottom = crop_box
    cx = (left + (np.arange(w) + 0.5) * (right - left) / w) * mw / iw  # mask column of each map column
    cy = (top + (np.arange(h) + 0.5) * (bottom - top) / h) * mh / ih
    col, row = np.floor(cx).astype(int), np.floor(cy).astype(int)
    ok_c, ok_r = (col >= 0) & (col < mw), (row >= 0) & (row < mh)
    out = mask[np.clip(row, 0, mh - 1)][:, np.clip(col, 0, mw - 1)]
    return out & ok_r[:, None] & ok_c[None, :]
