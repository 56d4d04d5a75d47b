"""Models given in memory (the tensor API): a LoadedModel as it is, or a plain nn.Module with its data config."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from saliency_cli.errors import UsageError
from saliency_cli.models.data_config import _merge_config, _normalise_config
from saliency_cli.models.labels import _use_labels_file, check_labels
from saliency_cli.models.loaded import LoadedModel
from saliency_cli.models.outputs import LogitsOnly
from saliency_cli.models.provenance import state_dict_sha256
from saliency_cli.models.timm_source import _timm_data_config
from saliency_cli.models.transformers_source import _labels as config_labels
from saliency_cli.models.transformers_source import probability_of


def module_data_config(module: torch.nn.Module) -> dict[str, Any] | None:
    """The data config a timm model carries (its pretrained_cfg, resolved by timm and made true to its input
    channels), normalised; None for any other module: its preprocessing is never guessed."""
    if not isinstance(getattr(module, "pretrained_cfg", None), Mapping):
        return None
    return _normalise_config(_timm_data_config(module, {}))


def module_probability(model: torch.nn.Module | LoadedModel) -> str:
    """`sigmoid` for a multi-label model (a LoadedModel's source says; a transformers model's config.problem_type),
    else `softmax`."""
    if isinstance(model, LoadedModel):
        return model.probability
    config = getattr(model, "config", None)
    return probability_of(config) if config is not None else "softmax"


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
        labels = None
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "id2label"):  # a transformers model: its class names and score
            labels, source["probability"] = config_labels(config), probability_of(config)
        loaded = LoadedModel(module=LogitsOnly(model), data_config=_merge_config(base, overrides), labels=labels,
                             source=source, known_classes=k if isinstance(k, int) and k > 0 else None,
                             labels_origin="the model's config.id2label" if labels else None)
    else:
        raise UsageError(f"model: expected a model name, an nn.Module or a LoadedModel, not {type(model).__name__}")
    if labels_file is not None:
        _use_labels_file(loaded, labels_file)
    check_labels(loaded)
    return loaded
