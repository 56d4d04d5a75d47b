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
from saliency_cli.processors import processor_preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class InputItem:
    """One input file and its key: its path relative to the common root of the inputs (used for outputs)."""

    path: Path
    key: str


def _inside(path: Path, folder: str | None) -> bool:
    if folder is None:
        return False
    absolute = os.path.abspath(path)
    return absolute == folder or absolute.startswith(folder + os.sep)


def discover(inputs: Iterable[str], stdin_lines: Iterable[str] | None = None, *, exclude: Path | None = None,
             excluded: list[Path] | None = None) -> list[InputItem]:
    """Image files from files, folders (recursive, sorted) and `-` (one path per line from `stdin_lines`).

    A folder contributes the files with an image suffix; a file named explicitly is taken whatever its
    suffix (a bad one becomes an error record, not a silent skip). Duplicates are dropped. Files under
    `exclude` (the output folder) are never inputs, so explanations are not explained again; they are appended
    to `excluded` when given.
    """
    skip = os.path.abspath(exclude) if exclude is not None else None
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
                # FIFOs and devices named like images too: each gets an error record, as when named directly
                (f for f in p.rglob("*") if not f.is_dir() and f.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            entries.extend((f, p) for f in files)
        elif p.exists():
            entries.append((p, p.parent))
        else:
            raise UsageError(f"input {arg} does not exist")
    if skip is not None:
        kept = [(f, base) for f, base in entries if not _inside(f, skip)]
        if excluded is not None:
            excluded.extend(f for f, base in entries if _inside(f, skip))
        entries = kept
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


MAX_PIXELS = 150_000_000  # decoded pixels of one image (--max-pixels): a 108 MP phone photo passes
MAX_FILE_BYTES = 1 << 30  # bytes read from one input file at most
RESIZE_LIMIT = 64  # the resized image may hold at most this many times the model's input pixels
DRAFT_FACTOR = 4  # JPEGs at least this many times larger (per side) than needed are decoded reduced


def read_input(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of one input file, never unbounded: FIFOs, devices and other non-regular files are refused
    (reading them could block or never end), and so is a file larger than `limit` (also one that grows)."""
    import stat

    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(
            st.st_mode) else "not a regular file"
        raise ImageError(f"{kind}, not an image file: skipped")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"larger than {limit / 2**20:.0f} MiB: refused")
    return data


def _open(data: bytes, max_pixels: int) -> Image.Image:
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image in a known format (JPEG, PNG, WebP, BMP, TIFF, GIF)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"more than {max_pixels / 1e6:.0f} MP (--max-pixels)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for truncated or broken files
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise ImageError(f"broken image data ({type(e).__name__}: {reason})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"{w} x {h} = {w * h / 1e6:.0f} MP, more than --max-pixels {max_pixels / 1e6:.0f} MP")
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and floating-point images to 8-bit grayscale by their real range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        if not np.isfinite(arr).all():
            raise ImageError("floating-point image with NaN or infinite pixels")
        top_value = float(arr.max()) if arr.size else 0.0
        if float(arr.min()) < 0:
            raise ImageError(f"floating-point image with negative values (min {arr.min():.3g}): unknown range")
        # values in [0, 1] are the usual float convention; larger ones are 8- or 16-bit values stored as floats
        top = 1.0 if top_value <= 1.0 else 255.0 if top_value <= 255.0 else 65535.0 if top_value <= 65535.0 else 0
        if not top:
            raise ImageError(f"floating-point image with values up to {top_value:.3g}: unknown range")
    else:
        # I;16 is 16-bit by definition (a dark image has all values below 256); I only by its values.
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def decode(data: bytes, name: str = "image", *, max_pixels: int = MAX_PIXELS,
           data_config: dict[str, Any] | None = None) -> Image.Image:
    """Bytes to an 8-bit RGB image: EXIF orientation applied, alpha flattened on white, 16-bit and float scaled
    by their range. Images over `max_pixels` are refused before their pixels are decoded. With `needed` (the
    (w, h) the model's resize wants), a JPEG at least DRAFT_FACTOR times larger per side is decoded reduced
    (libjpeg's draft mode, to no less than twice that size); `info["original_size"]` then keeps its true size.
    `needed` comes from `data_config`: the size the model's resize wants."""
    if not data:
        raise ImageError("empty file")
    img = _open(data, max_pixels)
    original = img.size
    needed = None  # an image processor (crop mode `processor`) is given the image as decoded, never reduced
    if data_config is not None and data_config.get("crop_mode") != "processor":
        needed = crop_geometry(original[0], original[1], data_config)[0]
    if needed is not None and img.format == "JPEG" and min(
            original[0] / max(1, needed[0]), original[1] / max(1, needed[1])) >= DRAFT_FACTOR:
        img.draft("RGB", (2 * needed[0], 2 * needed[1]))
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for truncated or broken files
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise ImageError(f"broken image data ({type(e).__name__}: {reason})") from None
    scaled = img.size != original
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if scaled:  # in the orientation the EXIF transpose gave: a 90-degree turn swaps the sides
        turned = (img.size[0] > img.size[1]) != (original[0] > original[1])
        img.info["original_size"] = (original[1], original[0]) if turned else original
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

    crop_box is [left, top, right, bottom] of the region the model saw, in the original image's pixels. A
    Hugging Face model's config (crop mode `processor`) runs its own image processor (processors.py).
    """
    from torchvision.transforms import functional as F

    if cfg.get("crop_mode") == "processor":
        return processor_preprocess(img, cfg["processor"], cfg["input_size"])
    c, th, tw = cfg["input_size"]
    (rw, rh), (left, top, right, bottom) = crop_geometry(img.width, img.height, cfg)
    if rw * rh > RESIZE_LIMIT * th * tw:
        raise ImageError(f"{img.width} x {img.height} would be resized to {rw} x {rh} for the model, more than "
                         f"{RESIZE_LIMIT} times its {tw} x {th} input: refused (extreme aspect ratio)")
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
    ow, oh = img.info.get("original_size", img.size)  # a JPEG decoded reduced keeps its true size here
    sx, sy = (img.width / rw) * (ow / img.width), (img.height / rh) * (oh / img.height)
    box = [left * sx, top * sy, right * sx, bottom * sy]
    return x, [round(v, 2) for v in box]


def visible_region(img: Image.Image, box: list[float]) -> Image.Image:
    """The part of the image the model saw (clipped to the image), at the decoded image's own resolution. box is
    in original pixels (`preprocess`'s crop box)."""
    ow, oh = img.info.get("original_size", img.size)
    fx, fy = img.width / ow, img.height / oh
    left, top, right, bottom = box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy
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
