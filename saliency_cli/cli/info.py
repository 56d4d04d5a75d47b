"""`saliency info`: the resolved model, its data config, class count and device, on stdout."""

from __future__ import annotations

import json

import typer
from rich.markup import escape

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
    for k, v in data.items():
        out.print(f"[bold]{k}[/bold]: {escape(str(v))}")
