"""`saliency explain`: parse the options, call `api.explain`, report counts; exit 3 when an input failed.

The method hyper-parameter options (`-n/--samples`, `--steps`, `--weight-noise`, ...) are generated from the
settings table (methods/settings.py), one option per row, so a new row is a new option with its help and check.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from saliency_cli.cli import complete
from saliency_cli.cli import options as o
from saliency_cli.cli.console import Progress, err, warn
from saliency_cli.errors import ExitCode, counted
from saliency_cli.methods.settings import SETTINGS, Setting

Inputs = Annotated[list[str], typer.Argument(metavar="INPUTS", show_default=False,
                                              help="Image files, folders (recursive), or - for paths on stdin")]
Method = Annotated[str, typer.Option(metavar="NAME[,NAME...]", rich_help_panel=o.METHOD,
                                     help="Method name, or a comma list (see `saliency methods`)",
                                     autocompletion=complete.completer(complete.method_names, comma_list=True))]
Target = Annotated[str, typer.Option(metavar="CLASS", rich_help_panel=o.METHOD,
                                     help="pred, a class index, a class name, or topk:K")]
Precision = Annotated[str, typer.Option(metavar="NAME", rich_help_panel=o.RUN, autocompletion=complete.choices(
    o.PRECISIONS), help="Autocast precision: fp32, bf16 or fp16 (maps stay fp32; bf16 maps rank-correlate only "
    "0.84-0.95 with fp32's, README: Speed)")]
Fast = Annotated[bool, typer.Option("--fast/--no-fast", rich_help_panel=o.RUN, help="Passes on a copy of the model "
                                    "with BatchNorm folded into the convolutions: the same maps within float32 "
                                    "rounding, faster")]
CompileModel = Annotated[bool, typer.Option("--compile", rich_help_panel=o.RUN, help="torch.compile the network "
                                            "once per run (see the README's Speed section for when it pays)")]
Workers = Annotated[int | None, typer.Option(metavar="N", rich_help_panel=o.RUN, show_default=False,
                                             help="Image decoding threads (default: CPU cores, at most 8)")]
Seed = Annotated[int, typer.Option(metavar="N", rich_help_panel=o.RUN,
                                   help="Run seed; each image's noise also depends on its bytes")]
Reduce = Annotated[str | None, typer.Option(metavar="NAME", rich_help_panel=o.METHOD, show_default=False,
                                            autocompletion=complete.choices(o.REDUCTIONS),
                                            help="Channel reduction of the saved map (default: the method's): "
                                            + ", ".join(o.REDUCTIONS) + "; none keeps (C, H, W)")]
Score = Annotated[str, typer.Option(metavar="NAME", rich_help_panel=o.METHOD, autocompletion=complete.choices(
    o.SCORES), help="Differentiate the " + ", ".join(o.SCORES))]
Colormap = Annotated[str | None, typer.Option(metavar="NAME", rich_help_panel=o.OUTPUTS, show_default=False,
                                              help="matplotlib colormap of the overlays",
                                              autocompletion=complete.completer(complete.colormap_names))]
Alpha = Annotated[float, typer.Option(metavar="X", rich_help_panel=o.OUTPUTS, help="Heatmap opacity of the overlays")]
Percentile = Annotated[float, typer.Option(metavar="X", rich_help_panel=o.OUTPUTS,
                                           help="Display clipping percentile")]
Overwrite = Annotated[bool, typer.Option("--overwrite", rich_help_panel=o.OUTPUTS,
                                         help="Redo images already finished in --out")]
Cheap = Annotated[bool, typer.Option("--cheap", rich_help_panel=o.METHOD, help="Each method's cheaper settings "
                                     "(see `saliency methods`); explicit options still win")]
MaxPixels = Annotated[float, typer.Option(metavar="N", rich_help_panel=o.RUN, show_default="150e6",
                                          help="Refuse images of more decoded pixels (a record says why)")]
OverlaySize = Annotated[int, typer.Option(metavar="N", rich_help_panel=o.OUTPUTS,
                                          help="Longest side of the overlays, in pixels")]
Tag = Annotated[str | None, typer.Option(metavar="TAG", rich_help_panel=o.OUTPUTS, show_default=False,
                                         help="A label for this configuration: its own files (KEY.METHOD@TAG.npy) "
                                         "and column (METHOD@TAG), beside the untagged ones")]
ReportFlag = Annotated[bool, typer.Option("--report", rich_help_panel=o.OUTPUTS, help="Also write OUT/index.html, "
                                          "a page over the run (see `saliency report`)")]


def explain(
    inputs: Inputs,
    model: o.Model = "default",
    checkpoint: o.Checkpoint = None,
    num_classes: o.NumClasses = None,
    in_chans: o.InChans = None,
    img_size: o.ImgSize = None,
    model_kwargs: o.ModelKwargs = None,
    weights: o.Weights = None,
    input_size: o.InputSize = None,
    mean: o.Mean = None,
    std: o.Std = None,
    crop_pct: o.CropPct = None,
    interpolation: o.Interpolation = None,
    labels: o.Labels = None,
    method: Method = "smoothgrad",
    target: Target = "pred",
    score: Score = "logit",
    reduce: Reduce = None,
    cheap: Cheap = False,
    out: o.OutDir = "saliency_out",
    overwrite: Overwrite = False,
    tag: Tag = None,
    colormap: Colormap = None,
    alpha: Alpha = 0.5,
    percentile: Percentile = 99.0,
    overlay_size: OverlaySize = 2048,
    report: ReportFlag = False,
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
    device: o.Device = "auto",
    precision: Precision = "fp32",
    batch_size: o.BatchSize = "auto",
    fast: Fast = True,
    compile_model: CompileModel = False,
    workers: Workers = None,
    seed: Seed = 0,
    max_pixels: MaxPixels = 150e6,
    shard: o.ShardOption = None,
    **settings: Any,
) -> None:
    """Explain every image: .npy maps, overlays and a manifest under --out."""
    from saliency_cli.methods import registered_names
    from saliency_cli.pipeline.plan import ExplainOptions, check_inputs, check_options

    hyper = {name: _setting_value(SETTINGS[name], value) for name, value in settings.items()}
    noise = hyper.pop("noise", None)
    stdin_lines = sys.stdin.read().splitlines() if "-" in inputs else None
    opts = ExplainOptions(
        inputs=inputs, out=o.out_path(out) or Path(), model=model, checkpoint=checkpoint,
        model_options=o.model_options(num_classes, in_chans, img_size, model_kwargs, weights),
        methods=[m.strip() for m in method.split(",") if m.strip()], noise=noise, hyper=hyper, target=target,
        device=device, precision=precision, batch_size=o.parse_batch_size(batch_size), seed=seed,
        reduce=reduce, score=score, colormap=colormap, alpha=alpha,
        percentile=percentile, overwrite=overwrite, cheap=cheap,
        data_overrides=o.data_overrides(input_size, mean, std, crop_pct, interpolation), labels_file=labels,
        stdin_lines=stdin_lines, max_pixels=int(max_pixels), overlay_size=overlay_size, shard=shard,
        fast=fast, compile=compile_model, workers=workers, tag=tag,
    )
    check_options(opts, registered_names())  # usage errors before torch is imported
    check_inputs(opts)
    counts = _run(opts, quiet, json_out)
    _write_report(opts.out, quiet, enabled=report)
    if counts.get("error", 0):
        raise typer.Exit(ExitCode.PARTIAL)


def _run(opts: Any, quiet: bool, json_out: bool) -> dict[str, int]:
    """Run the explain job with a progress bar and one line per failed input; print and return the counts."""
    from saliency_cli.api import explain as run_explain

    progress = Progress("explaining", not (quiet or json_out), unit="images")
    seen: set[str] = set()

    def on_record(rec: dict[str, Any]) -> None:
        if rec.get("status") == "error":
            err.print(f"[red]error[/red] {rec['image']} ({rec['method']}): {rec['error']}", markup=True)
        seen.add(rec["key"])
        progress.update(len(seen))

    try:
        info = run_explain(opts, on_record=on_record, on_start=progress.start,
                           echo=sys.stdout if json_out else None, on_warning=warn)
    finally:
        progress.stop()
    counts: dict[str, int] = info["counts"]
    if not json_out or not quiet:  # images as the progress bar counts them, then maps (records)
        err.print(f"{counted(len(seen), 'image')}, {counted(sum(counts.values()), 'map')}: "
                  f"{counts.get('ok', 0)} explained, "
                  f"{counts.get('skipped', 0)} skipped, {counts.get('error', 0)} failed -> {opts.out}", markup=False)
    return counts


def _write_report(out: Path, quiet: bool, enabled: bool) -> None:
    """`--report`: the page over the finished run, written after it (not part of the pipeline)."""
    if not enabled:
        return
    from saliency_cli.api import report

    result = report([out], out=out)
    for w in result.warnings:
        warn(w)
    if not quiet:
        err.print(f"report: {result.path}", markup=False)


def _setting_value(row: Setting, value: Any) -> Any:
    """A generated option's value: None (not given) or text to parse."""
    return None if value is None else row.parse(str(value))


def build_command() -> Callable[..., None]:
    """The explain command with one option per row of the settings table as it is now."""
    fixed = [p for p in inspect.signature(explain).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    hints = typing.get_type_hints(explain, include_extras=True)
    fixed = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in fixed]
    generated = [o.setting_option(row) for row in SETTINGS.values()]

    def command(**kwargs: Any) -> None:
        settings = {row: kwargs.pop(row) for row in list(kwargs) if row in SETTINGS}
        explain(**kwargs, **settings)

    params = [*fixed, *generated]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = explain.__doc__
    return command
