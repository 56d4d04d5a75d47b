"""Fitting a state dict to the architecture it was saved from: strict loading, class count and channels taken
from the checkpoint, and one-line mismatch messages that say what would make it fit."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch

from saliency_cli.errors import ModelError
from saliency_cli.models.loaded import TORCHVISION_PREFIX
from saliency_cli.models.messages import _reason


def _head_and_stem(module: torch.nn.Module) -> tuple[str | None, str | None]:
    """State-dict names (without `.weight`) of the classifier and of the first convolution: timm's
    pretrained_cfg names them; otherwise the last Linear and the first Conv2d."""
    own = module.state_dict()
    cfg = getattr(module, "pretrained_cfg", None) or {}

    def named(value: Any) -> str | None:
        value = value[0] if isinstance(value, (tuple, list)) and value else value
        return value if isinstance(value, str) and f"{value}.weight" in own else None

    head, stem = named(cfg.get("classifier")), named(cfg.get("first_conv"))
    if head is None:
        linears = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" in own]
        head = linears[-1] if linears else None
    if stem is None:
        convs = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d) and f"{n}.weight" in own]
        stem = convs[0] if convs else None
    return head, stem


def _detect(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The class count and input channels of a checkpoint, where they differ from the model's."""
    own = module.state_dict()
    head, stem = _head_and_stem(module)
    found: dict[str, int] = {}
    w = state.get(f"{head}.weight") if head else None
    if w is not None and w.ndim >= 2 and w.shape[0] != own[f"{head}.weight"].shape[0]:
        found["num_classes"] = int(w.shape[0])
    w = state.get(f"{stem}.weight") if stem else None
    if w is not None and w.ndim == 4 and w.shape[1] != own[f"{stem}.weight"].shape[1]:
        found["in_chans"] = int(w.shape[1])
    return found


def _subtree(state: dict[str, torch.Tensor], wanted: set[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """When a checkpoint holds the model under a prefix (a LightningModule's `self.model` next to a loss's
    weights, a wrapper's `backbone.`), the part under the prefix whose names are exactly the model's."""
    if state.keys() == wanted or wanted <= state.keys():
        return state, None
    prefixes = dict.fromkeys(".".join(k.split(".")[:d]) + "." for k in state for d in (1, 2, 3) if k.count(".") >= d)
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub.keys() == wanted:
            return sub, prefix
    return state, None


def _shape(t: torch.Tensor) -> str:
    """A tensor's shape as `10x512` (compact in one-line messages)."""
    return "x".join(str(s) for s in t.shape) or "scalar"


def _mismatch_hints(module: torch.nn.Module, state: dict[str, torch.Tensor], *, channels_option: bool,
                    arch: str | None, name: str) -> list[str]:
    """What would make the checkpoint fit: the option to set, or the architecture it says it is."""
    own = module.state_dict()
    head, stem = _head_and_stem(module)
    hints = []
    w = state.get(f"{head}.weight") if head else None
    if w is not None and w.ndim >= 2 and w.shape[0] != own[f"{head}.weight"].shape[0]:
        hints.append(f"its classifier has {w.shape[0]} classes: use --num-classes {w.shape[0]}")
    w = state.get(f"{stem}.weight") if stem else None
    if w is not None and w.ndim == 4 and w.shape[1] != own[f"{stem}.weight"].shape[1]:
        fix = f"use --in-chans {w.shape[1]}" if channels_option else f"{name} takes {own[f'{stem}.weight'].shape[1]}"
        hints.append(f"its first convolution takes {w.shape[1]} channels: {fix}")
    if arch and arch.split(".")[0] != name.split(".")[0].removeprefix(TORCHVISION_PREFIX):
        hints.append(f"it was trained as {arch}: try -m {arch}")
    matched = len(own.keys() & state.keys())
    if not hints and matched < len(own) / 2:
        hints.append(f"only {matched} of the model's {len(own)} names are in it: is it another architecture?")
    return hints


def _mismatch_error(what: str, name: str, module: torch.nn.Module, state: dict[str, torch.Tensor],
                    hints: list[str]) -> ModelError:
    """One line naming the first few missing, unexpected and mis-shaped keys (with shapes) and the fix."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {_shape(state[k])} vs {_shape(own[k])}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    text = ""
    for n in (3, 2, 1):
        parts = [f"{len(items)} {kind} ({', '.join(items[:n])}{', ...' if len(items) > n else ''})"
                 for kind, items in (("missing", missing), ("unexpected", unexpected),
                                     ("mis-shaped, checkpoint vs model", misshaped)) if items]
        text = f"{what} does not fit {name}: " + "; ".join(parts) + "".join(f"; {h}" for h in hints)
        if len(text) <= 380:
            break
    return ModelError(text)


def _fit(create: Callable[[dict[str, Any]], torch.nn.Module], kwargs: dict[str, Any], state: dict[str, torch.Tensor],
         info: dict[str, Any], *, name: str, explicit: Collection[str], channels_option: bool,
         ) -> tuple[torch.nn.Module, dict[str, int]]:
    """Build the model a state dict was saved from and load it exactly (strict, every key, every shape).

    The state dict is taken from under a prefix when the model sits under one; the class count and (where the
    builder has `in_chans`) the input channels follow the checkpoint unless the user set them. Returns the model
    and the values taken from the checkpoint.
    """
    module = create(kwargs)
    total = len(state)
    state, prefix = _subtree(state, set(module.state_dict()))
    if prefix is not None:
        info["stripped_prefixes"].append(prefix)
        info["ignored_keys"] = total - len(state)
    found = {k: v for k, v in _detect(module, state).items()
             if k not in explicit and (k == "num_classes" or channels_option)}
    if found:
        module = create({**kwargs, **found})
    own = module.state_dict()
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        hints = _mismatch_hints(module, state, channels_option=channels_option, arch=info.get("arch"), name=name)
        raise _mismatch_error(f"checkpoint {info['path']}", name, module, state, hints)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"checkpoint {info['path']} does not fit {name}: {_reason(e)}") from None
    return module, found
