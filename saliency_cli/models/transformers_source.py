"""Hugging Face transformers image classifiers: a folder written by `save_pretrained` (`-m DIR`,
`-m transformers:DIR`) or a repo in the local Hugging Face cache (`-m transformers:ORG/NAME[@REVISION]`, offline:
nothing is downloaded). Any architecture AutoModelForImageClassification builds; preprocessing is the model's own
image processor (PIL backend, see processors.py), class names its config's id2label, the score a softmax or, for
a multi-label model, a sigmoid. `transformers` is an optional extra, imported only here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from saliency_cli.errors import ImageError, ModelError, UsageError
from saliency_cli.models.loaded import _Built
from saliency_cli.models.messages import _reason
from saliency_cli.models.provenance import _record_file
from saliency_cli.processors import import_transformers, processor_of, run_processor, traced_box

TRANSFORMERS_PREFIX = "transformers:"
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's numbers
_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json")
_PROBES = ((320, 240), (240, 320), (256, 256))  # (width, height) of the images the processor is tried on


def is_transformers_folder(folder: Path) -> bool:
    """A folder whose config.json is a transformers config (`model_type` or `architectures`), not timm's
    (`architecture`)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "architecture" not in config and (
        "model_type" in config or "architectures" in config)


class HFClassifier(torch.nn.Module):
    """A transformers image classifier as saliency calls it: pixel values in, the output's `.logits` out (never
    `out[0]`: a ModelOutput skips its None fields)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, return_dict=True).logits


def _cached_folder(name: str) -> tuple[Path, str]:
    """The local Hugging Face cache's snapshot of `ORG/NAME[@REVISION]` and its commit; never downloads."""
    import_transformers()
    from huggingface_hub import constants, snapshot_download

    repo, _, revision = name.partition("@")
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, a bad repo name: the same answer
        raise ModelError(f"{TRANSFORMERS_PREFIX}{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
                         "saliency downloads nothing: fetch it once (hf download " + repo + ") or give a folder "
                         "written by save_pretrained") from None
    return folder, folder.name


def _folder(spec: str) -> tuple[Path, dict[str, Any]]:
    """The model folder of a spec (a folder, or a cached repo) and how it was named, for the source record."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: no config.json (a transformers model folder is written by save_pretrained)")
        return path, {"path": str(path)}
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(f"{TRANSFORMERS_PREFIX}{spec}: no such folder (give a folder written by save_pretrained, "
                         "or ORG/NAME of a model in the Hugging Face cache)")
    folder, revision = _cached_folder(spec)
    return folder, {"repo": spec.partition("@")[0], "revision": revision, "path": str(folder)}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers without its progress bars and info logging (saliency prints one line per problem)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_module(folder: Path) -> torch.nn.Module:
    """AutoModelForImageClassification from the folder's files only (no remote code, no download)."""
    import_transformers()
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot read the transformers config in {folder}: {_reason(e)}") from None
    try:
        with quiet():
            return AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ModelError(f"{folder} holds a {config.model_type} model, which has no image-classification head "
                             "(AutoModelForImageClassification does not build it)") from None
        raise ModelError(f"cannot load the transformers model in {folder}: {_reason(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load the transformers model in {folder}: {_reason(e)}") from None


def _processor_spec(folder: Path) -> dict[str, Any]:
    """The folder's image processor as a `{"class", "settings"}` record (PIL backend), checked to rebuild as is."""
    import_transformers()
    from transformers import AutoImageProcessor
    from transformers.image_processing_backends import PilBackend

    try:
        processor = AutoImageProcessor.from_pretrained(folder, backend="pil", local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load the image processor in {folder}: {_reason(e)}") from None
    if not isinstance(processor, PilBackend):
        raise ModelError(f"{type(processor).__name__} has no PIL backend: saliency cannot reproduce its "
                         "preprocessing exactly")
    settings = json.loads(json.dumps(processor.to_dict(), default=str))
    spec = {"class": type(processor).__name__, "settings": settings}
    rebuilt = json.loads(json.dumps(processor_of(spec).to_dict(), default=str))
    rebuilt.pop("image_processor_type", None)  # the traced class's own name
    if rebuilt != {k: v for k, v in settings.items() if k != "image_processor_type"}:
        raise ModelError(f"{spec['class']} does not rebuild from its settings; saliency cannot record it")
    return spec


def _probe_run(img: Image.Image, spec: dict[str, Any]) -> tuple[torch.Tensor, list[Any]]:
    """The processor on a test image at load time: a failure is the model's (ModelError), not an image's."""
    try:
        return run_processor(img, spec)
    except ImageError as e:
        raise ModelError(f"{spec['class']}: {e} (a {img.width} x {img.height} test image)") from None


def _centre(x: torch.Tensor) -> torch.Tensor:
    """The centre pixel's values (C,) in float64 (away from any padding a centre crop adds)."""
    return x[:, x.shape[1] // 2, x.shape[2] // 2].double()


def _affine(spec: dict[str, Any], channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std, per model-input channel, with which the processor maps a pixel value p in [0, 1] to
    (p - mean) / std: found on a black and a white image, and given as the processor's own image_mean and
    image_std when they are these numbers (a channel flip or an offset changes them)."""
    lo, hi = (_centre(_probe_run(Image.new("RGB", (256, 256), (v, v, v)), spec)[0]) for v in (0, 255))
    if torch.any(hi <= lo):
        raise ModelError(f"{spec['class']} does not map brighter pixels to larger values; saliency cannot bound "
                         "its inputs")
    std = 1.0 / (hi - lo)
    mean = -lo * std
    settings = spec["settings"]
    declared = [settings.get("image_mean"), settings.get("image_std")]
    if settings.get("do_normalize") and all(isinstance(d, list) and len(d) == channels for d in declared):
        if torch.allclose(torch.tensor(declared, dtype=torch.float64), torch.stack([mean, std]), atol=1e-5):
            return tuple(float(v) for v in declared[0]), tuple(float(v) for v in declared[1])
    return tuple(round(float(v), 7) + 0.0 for v in mean), tuple(round(float(v), 7) for v in std)


def processor_data_config(spec: dict[str, Any]) -> dict[str, Any]:
    """A data config whose preprocessing is the processor of `spec`: the input size it gives (the same for
    every image shape tried, else refused), its resample filter, its affine map of pixel values, the fraction of
    a square photo's side it keeps (crop_pct), crop mode `processor`."""
    shapes, sides = set(), 1.0
    for w, h in _PROBES:
        x, ops = _probe_run(Image.new("RGB", (w, h), (128, 128, 128)), spec)
        box, traced = traced_box(w, h, ops)
        if traced != tuple(x.shape[-2:]):
            raise ModelError(f"{spec['class']} resizes or pads in a way saliency cannot trace, so it could not say "
                             "which part of a photo the model saw")
        shapes.add(tuple(x.shape))
        sides = (box[2] - box[0]) / w
    if len(shapes) != 1:
        raise ModelError(f"{spec['class']} gives inputs whose size depends on the image's shape ("
                         + ", ".join("x".join(map(str, s)) for s in sorted(shapes)) + "); saliency needs one input "
                         "size: set a centre crop (do_center_crop, crop_size) or size height and width")
    size = shapes.pop()
    mean, std = _affine(spec, size[0])
    resample = spec["settings"].get("resample")
    return {"input_size": size, "interpolation": _RESAMPLE.get(resample, str(resample)), "mean": mean, "std": std,
            "crop_pct": round(sides, 4), "crop_mode": "processor", "processor": spec}


def data_config_from(processor: Any) -> dict[str, Any]:
    """The data config of a transformers image processor object (the tensor API's `data_config_from`): its PIL
    backend twin's settings, traced as for `-m DIR`."""
    transformers = import_transformers()
    from transformers.image_processing_backends import PilBackend

    cls = type(processor)
    if not isinstance(processor, PilBackend):
        twin = getattr(transformers, cls.__name__.removesuffix("Fast") + "Pil", None)
        if twin is None:
            raise UsageError(f"{cls.__name__} has no PIL backend: saliency cannot reproduce its preprocessing exactly")
        cls = twin
    settings = json.loads(json.dumps(processor.to_dict(), default=str))
    return processor_data_config({"class": cls.__name__, "settings": settings})


def _labels(config: Any) -> list[str] | None:
    """Class names from id2label, in index order; None for transformers' placeholders LABEL_0, LABEL_1, ..."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    k = int(getattr(config, "num_labels", len(id2label)))
    if sorted(id2label) != list(range(k)) or all(id2label[i] == f"LABEL_{i}" for i in range(k)):
        return None
    return [id2label[i] for i in range(k)]


def probability_of(config: Any) -> str:
    """`sigmoid` for a multi-label classifier (problem_type multi_label_classification), else `softmax`."""
    return "sigmoid" if getattr(config, "problem_type", None) == "multi_label_classification" else "softmax"


def _record_weights(source: dict[str, Any], folder: Path) -> None:
    """The sha256 of every weights file in the folder (single, sharded and their index), config and processor."""
    _record_file(source, "config", folder / "config.json")
    if (folder / "preprocessor_config.json").is_file():
        _record_file(source, "processor", folder / "preprocessor_config.json")
    files = sorted({p for pattern in _WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise ModelError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin)")
    for path in files:
        _record_file(source, "weights" if len(files) == 1 else f"weights:{path.name}", path)


def _transformers_model(spec: str, checkpoint: str | None, opts: dict[str, Any], overrides: dict[str, Any]) -> _Built:
    """A transformers image classifier from a folder or the cache, with its processor's data config."""
    if checkpoint is not None or opts:
        raise UsageError("--checkpoint and model options go with timm or torchvision names; a transformers model "
                         "folder holds its own weights and config")
    folder, named = _folder(spec)
    module = _load_module(folder)
    config: Any = module.config
    source: dict[str, Any] = {"kind": "transformers", "name": spec, **named,
                              "architecture": type(module).__name__, "model_type": config.model_type}
    if (folder / "preprocessor_config.json").is_file():
        if overrides:
            raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in sorted(overrides))}: the model's own "
                             "image processor sets its preprocessing (edit its preprocessor_config.json instead)")
        base = processor_data_config(_processor_spec(folder))
        source["processor"] = {"class": base["processor"]["class"], "backend": "pil"}
    elif not all(k in overrides for k in ("input_size", "mean", "std")):
        raise ModelError(f"{folder} has no preprocessor_config.json: save the model's image processor next to it "
                         "(processor.save_pretrained) or give --input-size, --mean and --std")
    else:
        base = {}
    source["probability"] = probability_of(config)
    source["transformers"] = import_transformers().__version__
    _record_weights(source, folder)
    labels = _labels(config)
    return _Built(HFClassifier(module), source, base, labels=labels,
                  labels_origin=f"id2label of {folder / 'config.json'}" if labels else None,
                  num_classes=int(config.num_labels))


def describe_processor(cfg: dict[str, Any]) -> str:
    """The processor's preprocessing in plain words (`saliency info`)."""
    spec = cfg["processor"]
    s = spec["settings"]
    w, h = _PROBES[0]
    x, ops = run_processor(Image.new("RGB", (w, h), (128, 128, 128)), spec)
    steps = [f"{spec['class']} (PIL backend): a {w} x {h} photo is"]
    for kind, _, (oh, ow) in ops:
        steps.append(f"resized to {ow} x {oh} ({cfg['interpolation']})" if kind == "resize"
                     else f"centre-cropped to {ow} x {oh}")
    text = steps[0] + " " + ", then ".join(steps[1:] or ["taken as it is"])
    if s.get("do_rescale"):
        text += f"; pixel values x {s.get('rescale_factor'):.6g}"
    if s.get("do_normalize"):
        text += f"; then (x - mean) / std, mean {s.get('image_mean')}, std {s.get('image_std')}"
    extra = sorted(k for k, v in s.items() if v is True and k not in (
        "do_resize", "do_rescale", "do_normalize", "do_center_crop", "do_convert_rgb"))
    if extra:
        text += "; also " + ", ".join(extra)
    return text + f"; model input {'x'.join(map(str, x.shape))}"
