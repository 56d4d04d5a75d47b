"""Model programs: TorchScript and torch.export files (checked to unpickle no code), whose preprocessing comes from
the options or a sidecar JSON."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import ModelError, UsageError
from saliency_cli.models.checkpoints import _is_safetensors
from saliency_cli.models.loaded import _Built
from saliency_cli.models.messages import _reason
from saliency_cli.models.outputs import logits_of
from saliency_cli.models.provenance import _record_file


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
