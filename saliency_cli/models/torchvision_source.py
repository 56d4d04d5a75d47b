"""torchvision classifiers: `torchvision:NAME` built without weights, loaded from --checkpoint or the torch hub
cache, with the preprocessing and class names of the torchvision weights named by --weights."""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch

from saliency_cli.errors import ModelError, UsageError
from saliency_cli.models.checkpoints import read_state_dict
from saliency_cli.models.fitting import _fit, _head_and_stem
from saliency_cli.models.loaded import TORCHVISION_PREFIX, _Built
from saliency_cli.models.messages import _reason
from saliency_cli.models.provenance import _record_file, _torch_hub_cached


def _torchvision_classifiers() -> list[str]:
    """torchvision's image-classification builders (not its detection, segmentation or video ones)."""
    from torchvision import models

    return list(models.list_models(module=models))


def _torchvision_builder(name: str) -> None:
    """Refuse a name that is not one of torchvision's classification builders, suggesting the closest."""
    from torchvision import models

    names = _torchvision_classifiers()
    if name in names:
        return
    if name in models.list_models():
        raise ModelError(f"{TORCHVISION_PREFIX}{name} is not an image classifier (saliency explains classifiers)")
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    suggestion = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"torchvision has no classifier {name!r}{suggestion}")


def _torchvision_weights(name: str, weights: str | None) -> Any:
    """The torchvision weights enum member named by --weights (`IMAGENET1K_V2`, `ResNet50_Weights.IMAGENET1K_V2`,
    `DEFAULT`), or None."""
    if weights is None:
        return None
    from torchvision import models

    members = models.get_model_weights(name).__members__
    key = weights.split(".")[-1]
    if key not in members:
        raise UsageError(f"--weights {weights}: {TORCHVISION_PREFIX}{name} has {', '.join(members)}")
    return members[key]


def _torchvision_data_config(weights: Any) -> dict[str, Any]:
    """Our data config from torchvision's eval transform (ImageClassification: Resize(resize) of the short side,
    CenterCrop(crop), normalise); reading it downloads nothing. crop_pct = crop / resize, kept such that
    data.crop_geometry's floor(crop / crop_pct) gives back exactly `resize`."""
    t = weights.transforms()
    crop_size, resize_size = getattr(t, "crop_size", None), getattr(t, "resize_size", None)
    if not crop_size or not resize_size or len(crop_size) != 1 or len(resize_size) != 1:
        raise ModelError(f"torchvision weights {weights} have no Resize + CenterCrop transform to copy")
    crop, resize = int(crop_size[0]), int(resize_size[0])
    pct = crop / resize
    if math.floor(crop / pct) != resize:  # float rounding: aim between resize and resize + 1
        pct = crop / (resize + 0.5)
    interpolation = getattr(t.interpolation, "value", str(t.interpolation))
    return {"input_size": (3, crop, crop), "interpolation": interpolation, "mean": tuple(t.mean), "std": tuple(t.std),
            "crop_pct": pct, "crop_mode": "center"}


def _torchvision_classes(module: torch.nn.Module) -> int | None:
    """The class count of a torchvision classifier: its `num_classes` (SqueezeNet) or its last Linear's rows."""
    k = getattr(module, "num_classes", None)
    if isinstance(k, int):
        return k
    head, _ = _head_and_stem(module)
    return int(module.state_dict()[f"{head}.weight"].shape[0]) if head else None


def _torchvision_model(name: str, checkpoint: str | None, opts: dict[str, Any], overrides: dict[str, Any]) -> _Built:
    """`torchvision.models.get_model(name, weights=None)` with the weights of --checkpoint (or of the torch hub
    cache); preprocessing and class names from the torchvision weights named by --weights."""
    from torchvision import models

    _torchvision_builder(name)
    for key in ("in_chans", "img_size"):
        if key in opts:
            raise UsageError(f"--{key.replace('_', '-')} goes with timm models; torchvision builders take their "
                             "own arguments (model_kwargs)")
    weights = _torchvision_weights(name, opts.get("weights"))
    if weights is None and not all(k in overrides for k in ("input_size", "mean", "std")):
        raise ModelError(f"{TORCHVISION_PREFIX}{name} carries no preprocessing: give --weights NAME (one of "
                         f"{', '.join(models.get_model_weights(name).__members__)}: its eval transform is copied) "
                         "or --input-size, --mean and --std")
    path = checkpoint or _torch_hub_cached(weights.url if weights is not None else None)
    if path is None:
        cached = f"; {weights.name}'s file is not in the torch hub cache ({torch.hub.get_dir()})" if weights else ""
        raise ModelError(f"{TORCHVISION_PREFIX}{name} needs weights: pass --checkpoint FILE (a torchvision state dict)"
                         f"; saliency downloads nothing{cached}")
    kwargs = {**opts.get("model_kwargs", {}), **({"num_classes": opts["num_classes"]} if "num_classes" in opts else {})}

    def create(kw: dict[str, Any]) -> torch.nn.Module:
        try:
            return models.get_model(name, weights=None, **kw)
        except (TypeError, ValueError) as e:
            raise ModelError(f"cannot build {TORCHVISION_PREFIX}{name} with {', '.join(sorted(kw))}: {_reason(e)}"
                             ) from None

    state, info = read_state_dict(path)
    module, found = _fit(create, kwargs, state, info, name=TORCHVISION_PREFIX + name, explicit=opts.keys(),
                         channels_option=False)
    resolved = {**opts, **found, **({"weights": weights.name} if weights is not None else {})}
    source: dict[str, Any] = {"kind": "torchvision", "name": name, "weights": str(path), "checkpoint": info,
                              "options": resolved}
    _record_file(source, "checkpoint", path)
    base = _torchvision_data_config(weights) if weights is not None else {}
    k = _torchvision_classes(module)
    categories = list(weights.meta.get("categories") or []) if weights is not None else []
    labels = [str(c) for c in categories] if categories and len(categories) == k else None
    origin = f"torchvision weights {weights.name}" if labels else None
    return _Built(module, source, base, labels=labels, labels_origin=origin, num_classes=k, probe=k is None)
