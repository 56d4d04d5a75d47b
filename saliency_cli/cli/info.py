"""`saliency info`: the resolved model, its data config, class count and device, on stdout."""

from __future__ import annotations

import json
from typing import Any

import typer

from saliency_cli.cli import options as o
from saliency_cli.cli.console import out


def info(
    model: o.Model = "default",
    checkpoint: o.Checkpoint = None,
    num_classes: o.NumClasses = None,
    in_chans: o.InChans = None,
    img_size: o.ImgSize = None,
    model_kwargs: o.ModelKwargs = None,
    weights: o.Weights = None,
    device: o.Device = "auto",
    input_size: o.InputSize = None,
    mean: o.Mean = None,
    std: o.Std = None,
    crop_pct: o.CropPct = None,
    interpolation: o.Interpolation = None,
    labels: o.Labels = None,
    json_out: o.JsonOut = False,
) -> None:
    """The resolved model, its data config, class count and device."""
    options = o.model_options(num_classes, in_chans, img_size, model_kwargs, weights)
    overrides = o.data_overrides(input_size, mean, std, crop_pct, interpolation)
    from saliency_cli.api import describe_model

    data = describe_model(model, checkpoint=checkpoint, device=device, labels_file=labels, overrides=overrides,
                          options=options)
    if json_out:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    for line in lines(data):
        out.print(line, markup=False)


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def lines(data: dict[str, Any], indent: str = "") -> list[str]:
    """`key: value` lines; a nested mapping as its key alone, then its own lines indented two spaces; lists and
    tuples as comma lists (no Python reprs)."""
    result = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            result.append(f"{indent}{key}:")
            result += lines(value, indent + "  ")
        else:
            result.append(f"{indent}{key}: {_plain(value) if value != {} else '-'}")
    return result
