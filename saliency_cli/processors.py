"""Hugging Face image processors as a model's preprocessing: the processor itself computes the model input (PIL
backend), and the crop box follows what it really did.

A data config whose crop mode is `processor` carries `processor`: `{"class": the PIL-backend class name,
"settings": its to_dict()}`; the processor is rebuilt from exactly that record (so what run.json records is what
runs). Its geometry is traced, not assumed: every resize and centre crop of the PIL backend is recorded as it
happens, and the crop box in original pixels is composed from them. `transformers` is imported only here and only
when such a config is used.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch
from PIL import Image

from saliency_cli.errors import ImageError, ModelError

HF_EXTRA = 'pip install "saliency-cli[hf]"'
MAX_ASPECT = 64  # longer side over shorter side at most (as data.RESIZE_LIMIT bounds timm's resize)
_local = threading.local()  # the operations traced in this thread's current processor call
_built: dict[str, Any] = {}  # processors by their record's JSON text
_lock = threading.Lock()


def import_transformers() -> Any:
    """The transformers module, or a one-line ModelError naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise ModelError(f"Hugging Face transformers models need the transformers package: {HF_EXTRA}") from None
    return transformers


def _tracing_base() -> type:
    """A PilBackend subclass that records the shape before and after each resize and centre crop; placed between
    a processor class and PilBackend, it also sees the calls a processor's own resize makes through super()."""
    import_transformers()
    from transformers.image_processing_backends import PilBackend

    class Traced(PilBackend):
        def resize(self, *args: Any, **kwargs: Any) -> Any:
            image = kwargs["image"] if "image" in kwargs else args[0]
            out = super().resize(*args, **kwargs)
            _ops().append(("resize", tuple(image.shape[-2:]), tuple(out.shape[-2:])))
            return out

        def center_crop(self, *args: Any, **kwargs: Any) -> Any:
            image = kwargs["image"] if "image" in kwargs else args[0]
            out = super().center_crop(*args, **kwargs)
            _ops().append(("crop", tuple(image.shape[-2:]), tuple(out.shape[-2:])))
            return out

    return Traced


def _ops() -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    if not hasattr(_local, "ops"):
        _local.ops = []
    ops: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = _local.ops
    return ops


def _processor(spec: dict[str, Any]) -> Any:
    """The traced processor of a `{"class", "settings"}` record."""
    transformers = import_transformers()
    from transformers.image_processing_backends import PilBackend

    cls = getattr(transformers, str(spec["class"]), None)
    if not isinstance(cls, type) or not issubclass(cls, PilBackend):
        raise ModelError(f"transformers {transformers.__version__} has no PIL image processor {spec['class']!r}")
    traced: Any = type(f"Traced{cls.__name__}", (cls, _tracing_base()), {})
    return traced.from_dict(spec["settings"])


def processor_of(spec: dict[str, Any]) -> Any:
    """The processor a data config's `processor` record describes (cached by the record's JSON text)."""
    key = json.dumps(spec, sort_keys=True)
    with _lock:
        if key not in _built:
            if len(_built) >= 8:
                _built.clear()
            _built[key] = _processor(spec)
        return _built[key]


def run_processor(img: Image.Image, spec: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[str, Any, Any]]]:
    """The model input (C, H, W) float32 the processor computes for an RGB image, and its traced operations."""
    processor = processor_of(spec)
    _local.ops = []
    try:
        values = processor(images=img, return_tensors="np")["pixel_values"]
    except Exception as e:  # noqa: BLE001 - the processor's own code raises anything
        raise ImageError(f"the image processor fails on this image ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:120]})") from None
    ops = list(_local.ops)
    return torch.from_numpy(np.ascontiguousarray(values[0], dtype=np.float32)), ops


def traced_box(width: int, height: int, ops: list[tuple[str, Any, Any]]) -> tuple[list[float], tuple[int, int]]:
    """The region of a width x height image that the processor's output covers, [left, top, right, bottom] in the
    image's pixels, and the output's (H, W), composed from its traced resizes and centre crops. A resize maps the
    whole image onto the new size (PIL's pixel-edge convention); a centre crop of (ch, cw) from (h, w) starts at
    ((h - ch) // 2, (w - cw) // 2), as transformers' center_crop (negative: zero padding)."""
    sx, sy, ox, oy = 1.0, 1.0, 0.0, 0.0  # original = current * scale + offset
    h, w = height, width
    for kind, before, after in ops:
        if tuple(before) != (h, w):
            raise ImageError(f"cannot follow the image processor's geometry ({kind} of {before[1]} x {before[0]} "
                             f"where {w} x {h} was expected)")
        if kind == "resize":
            sx, sy = sx * w / after[1], sy * h / after[0]
        else:
            ox, oy = ox + ((w - after[1]) // 2) * sx, oy + ((h - after[0]) // 2) * sy
        h, w = after
    return [ox, oy, ox + w * sx, oy + h * sy], (h, w)


def processor_preprocess(img: Image.Image, spec: dict[str, Any],
                         input_size: tuple[int, ...] | list[int]) -> tuple[torch.Tensor, list[float]]:
    """`data.preprocess` for a processor: the processor's own pixel values and the crop box, in original pixels,
    of what they show. Refused when the output is not the model's input size or the traced geometry does not
    account for its shape."""
    if max(img.size) > MAX_ASPECT * min(img.size):  # a shortest-edge resize would make it huge
        raise ImageError(f"{img.width} x {img.height}: an aspect ratio over {MAX_ASPECT}: refused")
    x, ops = run_processor(img, spec)
    box, (h, w) = traced_box(img.width, img.height, ops)
    if tuple(x.shape) != tuple(input_size):
        got, want = "x".join(map(str, x.shape)), "x".join(map(str, input_size))
        raise ImageError(f"the image processor gives a {got} input for this image, not the model's {want}")
    if (h, w) != tuple(x.shape[-2:]):
        raise ImageError(f"cannot follow the image processor's geometry (it resizes or pads in a way saliency does "
                         f"not trace: {w} x {h} traced, {x.shape[-1]} x {x.shape[-2]} given)")
    ow, oh = img.info.get("original_size", img.size)
    fx, fy = ow / img.width, oh / img.height
    return x, [round(v, 2) for v in (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)]
