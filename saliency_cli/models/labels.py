"""Class names: ImageNet's, a labels file, the class count they must match."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import UsageError
from saliency_cli.models.loaded import DEFAULT_MODEL, TORCHVISION_PREFIX, LoadedModel
from saliency_cli.models.outputs import logits_of
from saliency_cli.models.provenance import _record_file


def imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def read_labels(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--labels {path}: {e.strerror or e}") from None
    if p.suffix.lower() == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--labels {path}: not valid JSON ({e.msg})") from None
        if not isinstance(names, list):
            raise UsageError(f"--labels {path}: expected a JSON list of class names")
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def labels_before_loading(spec: Any, checkpoint: str | None, options: Mapping[str, Any] | None,
                          labels_file: str | None) -> list[str] | None:
    """The class names a model will have, when they are known without building it or reading its weights: a
    labels file's, or ImageNet's for the bundled model and a timm registry name whose pretrained config has
    1000 classes (no checkpoint, no --num-classes). None when only loading can tell."""
    if labels_file is not None:
        return read_labels(labels_file)
    if not isinstance(spec, str) or checkpoint is not None:
        return None
    opts = dict(options or {})
    if spec == DEFAULT_MODEL:
        return imagenet_labels()
    if opts.get("num_classes") is not None or "num_classes" in (opts.get("model_kwargs") or {}):
        return None
    other_sources = (TORCHVISION_PREFIX, "transformers:", "local-dir:", "hf-hub:", "hf_hub:")
    if spec.startswith(other_sources) or Path(spec).exists():
        return None
    try:
        from timm.models import get_pretrained_cfg, is_model, split_model_name_tag

        if not is_model(split_model_name_tag(spec.removeprefix("timm/"))[0]):
            return None
        cfg = get_pretrained_cfg(spec.removeprefix("timm/"), allow_unregistered=False)
    except (RuntimeError, ValueError, ImportError):
        return None
    return imagenet_labels() if cfg is not None and cfg.num_classes == 1000 else None


def num_classes(loaded: LoadedModel) -> int:
    """The model's class count: its `num_classes` attribute (timm), what loading found, or else the width of
    one no-grad forward pass on zeros of the data config's input size, on the model's device, in eval mode (a
    model given in train mode gets its modes back, its BatchNorm statistics untouched)."""
    k = getattr(loaded.module, "num_classes", None)
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        return k
    if loaded.known_classes is None:
        x = torch.zeros((1, *loaded.data_config["input_size"]), device=loaded.device)
        modules = list(loaded.module.modules())
        modes = [m.training for m in modules]
        try:
            loaded.module.eval()
            with torch.no_grad():
                loaded.known_classes = int(logits_of(loaded.module(x)).shape[-1])
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.training = mode
    return loaded.known_classes


def check_labels(loaded: LoadedModel) -> None:
    """Refuse class names whose count is not the model's class count (UsageError naming their origin)."""
    if loaded.labels is None:
        return
    k, n = num_classes(loaded), len(loaded.labels)
    if n != k:
        raise UsageError(f"{loaded.labels_origin or '--labels'}: {n} names for a model with {k} classes")


def _use_labels_file(loaded: LoadedModel, labels_file: str) -> None:
    """Take the class names of a labels file, and record the file and its sha256 in the model's source."""
    loaded.labels = read_labels(labels_file)
    loaded.labels_origin = f"--labels {labels_file}"
    loaded.source["labels_file"] = str(labels_file)
    _record_file(loaded.source, "labels", labels_file)


def attach_default_labels(model: LoadedModel, num_classes: int) -> None:
    """ImageNet class names for 1000-class models that have none of their own."""
    if model.labels is None and num_classes == 1000:
        model.labels = imagenet_labels()
