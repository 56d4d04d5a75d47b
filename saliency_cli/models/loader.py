"""`load_model`, the one entry point: the model spec dispatched to its source, the data config merged, the labels
checked; and `load_model_from_source`, which reloads exactly what a run.json records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from saliency_cli.errors import ModelError, UsageError
from saliency_cli.models.data_config import _merge_config
from saliency_cli.models.default import _bundled_model
from saliency_cli.models.labels import _use_labels_file, check_labels
from saliency_cli.models.loaded import _DATA_KEYS, DEFAULT_MODEL, OPTION_KEYS, TORCHVISION_PREFIX, LoadedModel, _Built
from saliency_cli.models.outputs import _probe
from saliency_cli.models.programs import _file_model
from saliency_cli.models.provenance import state_dict_sha256
from saliency_cli.models.timm_source import _timm_model
from saliency_cli.models.torchvision_source import _torchvision_model
from saliency_cli.models.transformers_source import TRANSFORMERS_PREFIX, _transformers_model, is_transformers_folder


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
    """Dispatch on the model spec: default, torchvision:NAME, transformers:DIR or ORG/NAME, a model file, a
    transformers or timm model folder (by its config.json's keys), a timm name."""
    if spec == DEFAULT_MODEL:
        if checkpoint is not None:
            raise UsageError("--checkpoint goes with a timm architecture name, not the default model")
        if opts:
            raise UsageError(f"model options ({', '.join(sorted(opts))}) go with timm or torchvision names, "
                             "not the default model")
        return _bundled_model()
    if spec.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(spec[len(TORCHVISION_PREFIX):], checkpoint, opts, overrides)
    if spec.startswith(TRANSFORMERS_PREFIX):
        return _transformers_model(spec[len(TRANSFORMERS_PREFIX):], checkpoint, opts, overrides)
    path = Path(spec)
    if path.is_file():
        return _file_model(path, checkpoint, opts, overrides)
    if path.is_dir() and (path / "config.json").is_file():
        if is_transformers_folder(path):
            return _transformers_model(spec, checkpoint, opts, overrides)
        return _timm_model(f"local-dir:{spec}", checkpoint, opts)
    return _timm_model(spec, checkpoint, opts)


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
    folder holding timm's config.json, `hf-hub:owner/name`, `torchvision:NAME`, a Hugging Face transformers
    image classifier (a folder holding its config.json, `transformers:FOLDER` or `transformers:ORG/NAME` from the
    local cache), or a TorchScript or torch.export (`.pt2`) file. checkpoint: weights for a timm or torchvision
    architecture (see `read_state_dict`).
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
    elif kind == "transformers":
        spec = TRANSFORMERS_PREFIX + str(source.get("path") or source["name"])
        if data_config.get("crop_mode") == "processor":
            overrides = {}  # the folder's own processor (its sha256 is checked below)
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
