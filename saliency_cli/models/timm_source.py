"""timm models: registry names (pretrained weights from the local cache, or --checkpoint), `local-dir:` folders and
`hf-hub:` repos, with timm's own data config made true to the model built."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import ModelError, UsageError
from saliency_cli.models.checkpoints import read_state_dict
from saliency_cli.models.fitting import _fit, _head_and_stem
from saliency_cli.models.loaded import TORCHVISION_PREFIX, _Built
from saliency_cli.models.messages import _reason
from saliency_cli.models.provenance import _hub_files, _record_file, _torch_hub_cached
from saliency_cli.models.torchvision_source import _torchvision_classifiers
from saliency_cli.models.transformers_source import is_transformers_folder

_FILE_SUFFIXES = {".pt", ".pt2", ".pth", ".ts", ".jit", ".ptl", ".bin", ".safetensors", ".ckpt", ".tar"}


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
        if Path(spec[len("hf-hub:"):]).is_dir():
            raise ModelError(f"{spec}: hf-hub: names a repo on the hub; for the folder, use -m {spec[len('hf-hub:'):]}")
        return spec, "hf-hub"
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:"):])
        if not (folder / "config.json").is_file():
            raise ModelError(f"{spec}: no {folder / 'config.json'} (a timm model folder holds config.json and "
                             "model.safetensors, as timm's save_for_hf writes them)")
        if is_transformers_folder(folder):
            raise ModelError(f"{spec}: {folder} holds a Hugging Face transformers model, not a timm one: use "
                             f"-m {folder}")
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
