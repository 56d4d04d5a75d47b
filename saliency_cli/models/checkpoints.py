"""Checkpoint files read as data: safetensors, or torch.save files with `weights_only=True` and a small allow-list
of plain classes (pickled code never runs); training-checkpoint wrappers and prefixes taken off."""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import ModelError
from saliency_cli.models.messages import _clip, _reason

_WRAPPERS = (("state_dict_ema", True), ("model_ema", True), ("state_dict", False), ("model", False),
             ("model_state_dict", False))
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP / DataParallel, nested in either order


def _plain_globals() -> list[Any]:
    """Classes besides tensors that training checkpoints carry and whose unpickling builds plain data only:
    argparse.Namespace (timm train.py's `args`), paths, and numpy scalars and dtypes (metrics saved as numpy)."""
    allowed: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                          pathlib.PureWindowsPath]
    try:
        import numpy as np

        allowed.append(np.dtype)
        try:
            from numpy._core.multiarray import scalar  # type: ignore[attr-defined]
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar  # type: ignore[attr-defined,no-redef]
        allowed.append(scalar)
    except ImportError:
        pass
    return allowed


def _refusal(path: str | Path, e: BaseException) -> ModelError:
    """PyTorch's long 'Weights only load failed' text, summarised in one line that names the first object."""
    text = _clip(str(e), 100_000)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        what = f"first: GLOBAL {found.group(1)}"
    else:
        other = re.search(r"WeightsUnpickler error: (.+?)(?: Please | Check the documentation|$)", text)
        what = _clip(other.group(1).rstrip(". "), 100) if other else "an object pickle would have to construct"
    return ModelError(f"cannot read checkpoint {path}: it holds Python objects that are not plain data ({what}); "
                      "saliency never unpickles code")


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers, plus the few `_plain_globals`; never code."""
    try:
        with torch.serialization.safe_globals(_plain_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise _refusal(path, e) from None
        raise ModelError(f"cannot read checkpoint {path}: {_reason(e)}") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's fault
        raise ModelError(f"cannot read checkpoint {path}: {_reason(e)}") from None


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte little-endian header length followed by the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 28)


def _unwrap(checkpoint: Any, use_ema: bool) -> tuple[Any, str | None, bool]:
    """The state dict inside a training checkpoint, the key it was under and whether it holds EMA weights.

    The order is timm's `load_state_dict`: `state_dict_ema`, `model_ema` (EMA weights are what timm evaluates),
    then `state_dict` (timm train.py, PyTorch Lightning), `model`, and `model_state_dict` (a common hand-made one).
    """
    if isinstance(checkpoint, dict):
        for key, ema in _WRAPPERS:
            if (use_ema or not ema) and isinstance(checkpoint.get(key), dict) and checkpoint[key]:
                return checkpoint[key], key, ema
    return checkpoint, None, False


def _strip_wrapper_prefixes(state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes, nested in either order, as timm's
    `clean_state_dict` does; return the prefixes found."""
    found: list[str] = []
    out: dict[str, Any] = {}
    for key, value in state.items():
        stripping = True
        while stripping:
            stripping = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripping = key[len(prefix):], True
                    if prefix not in found:
                        found.append(prefix)
        out[key] = value
    return out, found


def _provenance(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a training checkpoint says about itself, when plain: the architecture (timm's `arch` or `args.model`,
    a Lightning hyper-parameter), the epoch, the Lightning version."""
    out: dict[str, Any] = {}
    arch = checkpoint.get("arch")
    args = checkpoint.get("args")
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(arch, str) and isinstance(args, argparse.Namespace):
        arch = getattr(args, "model", None)
    if not isinstance(arch, str) and isinstance(hparams, dict):
        arch = next((hparams[k] for k in ("model_name", "arch", "architecture") if isinstance(hparams.get(k), str)),
                    None)
    if isinstance(arch, str):
        out["arch"] = arch
    epoch = checkpoint.get("epoch")
    if isinstance(epoch, torch.Tensor) and epoch.numel() == 1:
        epoch = epoch.item()
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        out["epoch"] = int(epoch)
    if isinstance(checkpoint.get("pytorch-lightning_version"), str):
        out["lightning"] = checkpoint["pytorch-lightning_version"]
    return out


def read_state_dict(path: str | Path, *, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights in a checkpoint file, and a description of what was taken from it.

    Reads what `timm.models.load_checkpoint` reads: `.safetensors`, or a torch.save file loaded with
    `weights_only=True` (tensors and plain data; argparse.Namespace and the like allowed, pickled code refused):
    a bare state dict, a timm train.py checkpoint (EMA weights preferred), a PyTorch Lightning checkpoint (its
    module's attribute prefix, e.g. `model.`, removed), `model`/`model_state_dict` wrappers, and DDP `module.` /
    torch.compile `_orig_mod.` prefixes. The description (JSON-able) is
    `{"path", "format", "key", "ema", "stripped_prefixes"}` plus `arch`, `epoch` and `lightning` when recorded.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    info: dict[str, Any] = {"path": str(path)}
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            checkpoint: Any = load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot read checkpoint {path}: {_reason(e)}") from None
        info["format"] = "safetensors"
    else:
        checkpoint = _torch_load(p)
        info["format"] = "torch"
    state, key, ema = _unwrap(checkpoint, use_ema)
    info.update(key=key, ema=ema)
    if not isinstance(state, dict) or not state:
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors")
    bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ModelError(f"checkpoint {path} does not hold a state dict of tensors "
                         f"({_clip(repr(bad[0]), 60)} is a {type(bad[1]).__name__})")
    state, stripped = _strip_wrapper_prefixes(state)
    if isinstance(checkpoint, dict) and "pytorch-lightning_version" in checkpoint:
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) == 1 and all("." in k for k in state):  # the LightningModule holds the model as one attribute
            prefix = heads.pop() + "."
            state = {k[len(prefix):]: v for k, v in state.items()}
            stripped.append(prefix)
    info["stripped_prefixes"] = stripped
    if key is not None and isinstance(checkpoint, dict):
        info.update(_provenance(checkpoint))
    return state, info
