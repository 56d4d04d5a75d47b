"""Model outputs: the class logits in whatever a model returns, and the one probe forward pass at load time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from saliency_cli.errors import ModelError
from saliency_cli.models.messages import _clip, _reason


def logits_of(output: Any) -> torch.Tensor:
    """The class logits in what a model returned: a tensor itself, the first tensor of a tuple or list, the
    `logits` entry (or only tensor) of a dict, or a `.logits` attribute."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        keys = _clip(", ".join(str(k) for k in output), 120)
        raise ModelError(f"the model returned a dict with keys {keys}; saliency needs class logits (a tensor, or "
                         "a dict with a 'logits' entry)")
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
        raise ModelError(f"the model returned a {type(output).__name__} of {len(output)} items and no tensor; "
                         "saliency needs class logits")
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise ModelError(f"the model returned a {type(output).__name__}; saliency needs class logits (a tensor)")


class LogitsOnly(torch.nn.Module):
    """A model whose forward returns a tuple, list or dict, reduced to its class logits (see `logits_of`), so
    that the rest of saliency only ever sees (N, K) tensors. The wrapped model is otherwise untouched."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def _probe(module: torch.nn.Module, cfg: dict[str, Any], device: torch.device | str) -> tuple[torch.nn.Module, int]:
    """One no-grad forward pass on zeros of the configured size: wraps the module in LogitsOnly if its output is
    not a tensor, and gives the class count. A model that fails here would fail on every image."""
    x = torch.zeros((1, *cfg["input_size"]), device=device)
    try:
        with torch.no_grad():
            output = module(x)
    except Exception as e:  # noqa: BLE001 - the model's own code raises anything
        size = "x".join(str(s) for s in cfg["input_size"])
        raise ModelError(f"the model fails on a {size} input ({_reason(e, 120)}); check --input-size") from None
    logits = logits_of(output)
    if logits.ndim != 2 or logits.shape[0] != 1:
        raise ModelError(f"the model returned a tensor of shape {tuple(logits.shape)} for one image; saliency needs "
                         "class logits, (N, K)")
    return (module if isinstance(output, torch.Tensor) else LogitsOnly(module)), int(logits.shape[1])
