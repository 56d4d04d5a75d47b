"""Inputs: discovery, decoding, preprocessing from the model's data config, crop boxes, per-image seeds."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from saliency_cli.errors import ImageError, UsageError
from saliency_cli.numerics import derive_seed

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class InputItem:
    """One input file and its key: its path relative to the common root of the inputs (used for outputs)."""

    path: Path
    key: str


def discover(inputs: Iterable[str], stdin_lines: Iterable[str] | None = None) -> list[InputItem]:
    """Image files from files, folders (recursive, sorted) and `-` (one path per line from `stdin_lines`).

    A folder contributes the files with an image suffix; a file named explicitly is taken whatever its
    suffix (a bad one becomes an error record, not a silent skip). Duplicates are dropped.
    """
    entries: list[tuple[Path, Path]] = []  # (file, base folder its key is relative to)
    for arg in inputs:
        if arg == "-":
            for line in stdin_lines or []:
                line = line.strip()
                if line:
                    p = Path(line)
                    entries.append((p, p.parent))
            continue
        p = Path(arg)
        if p.is_dir():
            files = sorted(
                (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            entries.extend((f, p) for f in files)
        elif p.exists():
            entries.append((p, p.parent))
        else:
            raise UsageError(f"input {arg} does not exist")
    if not entries:
        return []
    bases = [os.path.abspath(base) for _, base in entries]
    root = os.path.commonpath(bases)
    seen: set[str] = set()
    items = []
    for f, _ in entries:
        absolute = os.path.abspath(f)
        if absolute in seen:
            continue
        seen.add(absolute)
        key = Path(os.path.relpath(absolute, root)).as_posix()
        items.append(InputItem(path=f, key=key))
    return items


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_seed(run_seed: int, digest: str) -> int:
    """The seed of one image's generator: a function of the run seed and the file's bytes only."""
    return derive_seed(run_seed, digest)


def decode(data: bytes, name: str = "image") -> Image.Image:
    """Bytes to an 8-bit RGB image: EXIF orientation applied, alpha flattened on white, 16-bit scaled."""
    import io

    if not data:
        raise ImageError("empty file")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise ImageError("not an image in a known format (JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for truncated or broken files
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise ImageError(f"broken image data ({type(e).__name__}: {reason})") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # I;16 is 16-bit by definition (a dark image has all values below 256); I and F only by their values.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


_INTERPOLATIONS = {"bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"}  # torchvision's names


def crop_geometry(width: int, height: int, cfg: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Resize size (w, h) and the crop (left, top, right, bottom) in resized pixels, exactly as timm's eval
    transform (`transforms_imagenet_eval`) computes them for crop modes `center` and `squash`."""
    _, th, tw = cfg["input_size"]
    pct = cfg["crop_pct"]
    sh, sw = math.floor(th / pct), math.floor(tw / pct)
    if cfg["crop_mode"] == "squash":
        rw, rh = sw, sh
    elif sh == sw:  # torchvision Resize(int): the shorter side becomes sh
        if width <= height:
            rw, rh = sh, int(sh * height / width)
        else:
            rw, rh = int(sh * width / height), sh
    else:  # timm ResizeKeepRatio: cover the target, keep the aspect ratio
        ratio = min(height / sh, width / sw)
        rw, rh = round(width / ratio), round(height / ratio)
    top = int(round((rh - th) / 2.0))
    left = int(round((rw - tw) / 2.0))
    return (rw, rh), (left, top, left + tw, top + th)


def preprocess(img: Image.Image, cfg: dict[str, Any]) -> tuple[torch.Tensor, list[float]]:
    """An RGB image to the model's normalised input (C, H, W) and the crop box in original pixels.

    crop_box is [left, top, right, bottom] of the region the model saw, in the original image's pixels.
    """
    from torchvision.transforms import functional as F

    c, th, tw = cfg["input_size"]
    (rw, rh), (left, top, right, bottom) = crop_geometry(img.width, img.height, cfg)
    name = cfg["interpolation"] if cfg["interpolation"] in _INTERPOLATIONS else "bilinear"
    interp = F.InterpolationMode(name)
    resized = F.resize(img, [rh, rw], interpolation=interp, antialias=True)
    cropped = F.crop(resized, top, left, th, tw)  # pads with zeros if the crop leaves the image
    x = F.to_tensor(cropped)
    if c == 1:
        x = x.mean(0, keepdim=True)
    elif c != 3:
        raise ImageError(f"the model expects {c} input channels; only 1 and 3 are supported")
    x = F.normalize(x, cfg["mean"], cfg["std"])
    sx, sy = img.width / rw, img.height / rh
    box = [left * sx, top * sy, right * sx, bottom * sy]
    return x, [round(v, 2) for v in box]


def visible_region(img: Image.Image, box: list[float]) -> Image.Image:
    """The part of the original image the model saw (clipped to the image), at its own resolution."""
    left, top, right, bottom = box
    clipped = (max(0, round(left)), max(0, round(top)), min(img.width, round(right)), min(img.height, round(bottom)))
    return img.crop(clipped)


@dataclass(frozen=True)
class InputRange:
    """The valid values of a normalised input, per channel: pixel value 0 maps to `lo`, 1 to `hi`; (C, 1, 1) each.

    AdaptGrad's per-element noise, the `black` and `uniform` baselines and the uniform infill of `aupc` need it.
    """

    lo: torch.Tensor
    hi: torch.Tensor

    def to(self, device: torch.device | str) -> InputRange:
        return InputRange(self.lo.to(device), self.hi.to(device))


def input_bounds(cfg: dict[str, Any]) -> InputRange:
    """Per-channel bounds of a normalised input, [(0 - mean)/std, (1 - mean)/std], shaped (C, 1, 1)."""
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(-1, 1, 1)
    return InputRange((0 - mean) / std, (1 - mean) / std)


def baseline(x: torch.Tensor, kind: str, bounds: InputRange, generators: list[torch.Generator]) -> torch.Tensor:
    """Reference inputs of paths, masks and perturbation metrics, defined in pixel space and then normalised
    like x: (B, C, H, W).

    black: pixel value 0. mean: the normalisation mean colour (0 in normalised space). blur: the image under a
    Gaussian blur (sigma 5 % of its side; blur commutes with the per-channel affine normalisation). uniform:
    uniform random pixels from each image's generator.
    """
    if kind == "black":
        return bounds.lo.expand_as(x[0]).expand_as(x).clone()
    if kind == "mean":
        return torch.zeros_like(x)
    if kind == "blur":
        from torchvision.transforms.functional import gaussian_blur

        sigma = max(1.0, 0.05 * min(x.shape[-2:]))
        size = 2 * math.ceil(3 * sigma) + 1
        return gaussian_blur(x, [size, size], [sigma, sigma])
    if kind == "uniform":
        u = torch.stack([torch.rand(x.shape[1:], generator=g, device=x.device) for g in generators])
        return bounds.lo + u * (bounds.hi - bounds.lo)
    raise ValueError(f"unknown baseline {kind!r}")
