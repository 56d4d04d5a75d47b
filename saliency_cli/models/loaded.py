"""What every model source gives: a LoadedModel (module, data config, labels, source record) or, before the move to
the device, a _Built; the model-spec constants; the device choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from saliency_cli.errors import UsageError, unknown

DEFAULT_MODEL = "default"
TORCHVISION_PREFIX = "torchvision:"
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
OPTION_KEYS = ("num_classes", "in_chans", "img_size", "model_kwargs", "weights")


@dataclass
class LoadedModel:
    """A classifier ready for attribution, with what is needed to feed it and to name its classes.

    labels_origin names where the labels came from in errors ("--labels FILE", "sidecar FILE"); known_classes is
    the class count when loading found it (a probe forward pass), so `num_classes` need not run the model again.
    """

    module: torch.nn.Module
    data_config: dict[str, Any]
    labels: list[str] | None
    source: dict[str, Any] = field(default_factory=dict)
    labels_origin: str | None = field(default=None, repr=False)
    known_classes: int | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        for t in self.module.parameters():
            return t.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def probability(self) -> str:
        """How a logit becomes the probability a manifest records: `softmax`, or `sigmoid` (multi-label)."""
        return str(self.source.get("probability") or "softmax")

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)

    def class_index(self, name: str) -> int:
        """The index of a class given by name (exact, case-insensitive, or one of its comma synonyms)."""
        if self.labels is None:
            raise UsageError(f"--target {name!r}: this model has no class names (give --labels FILE)")
        return find_class(name, self.labels)


def unknown_class(name: str, labels: list[str]) -> UsageError:
    """`--target: unknown class name 'dgo'; did you mean 'dingo'?` over the names and their comma synonyms."""
    synonyms = [s.strip() for label in labels for s in label.split(",") if s.strip()]
    return unknown("--target", "class name", name, synonyms, see="see --labels, or give a class index")


def find_class(name: str, labels: list[str]) -> int:
    """The index of a class given by name (exact, case-insensitive, or one of its comma synonyms)."""
    wanted = name.strip().lower()
    for i, label in enumerate(labels):
        if label.lower() == wanted or wanted in (s.strip().lower() for s in label.split(",")):
            return i
    raise unknown_class(name, labels)


@dataclass
class _Built:
    """A module before its move to the device, its source, base data config and labels (if it brings any)."""

    module: torch.nn.Module
    source: dict[str, Any]
    base_cfg: dict[str, Any]
    labels: list[str] | None = None
    labels_origin: str | None = None
    num_classes: int | None = None
    probe: bool = False  # run one forward pass at load: outputs of unknown form, class count unknown


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N` or `mps`."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return device
