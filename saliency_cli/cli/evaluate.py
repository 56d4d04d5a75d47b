"""`saliency evaluate`: parse the options, call `api.evaluate`, print the comparison table, gate.

Data goes to stdout (`--json`), people's messages to stderr; a failed gate exits 4 (ExitCode.GATE) naming the
metric, the method and the value. No torch at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from saliency_cli.cli import complete
from saliency_cli.cli import options as o
from saliency_cli.cli.console import Progress, err, listing, table, warn
from saliency_cli.errors import ExitCode, UsageError

Runs = Annotated[list[Path] | None, typer.Argument(help="Run folders of `saliency explain` (several: compared side "
                                                   "by side)", show_default=False)]


def parse_bounds(values: list[str] | None, option: str) -> dict[str, float]:
    """`metric=value` items (repeatable; commas allowed inside one) -> {metric: value}."""
    bounds: dict[str, float] = {}
    for value in values or []:
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, number = item.partition("=")
            try:
                bound = float(number)
            except ValueError:
                bound = float("nan")
            if not sep or not name.strip() or bound != bound:
                raise UsageError(f"{option} {item!r}: expected METRIC=NUMBER, e.g. insertion=0.4")
            bounds[name.strip()] = bound
    return bounds


def _names(text: str | None, option: str = "--metrics") -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError(f"{option} {text!r}: give at least one name")
    return names


def evaluate(
    runs: Runs = None,
    metrics: Annotated[str | None, typer.Option(metavar="NAME[,NAME...]", autocompletion=complete.completer(
        complete.metric_names, comma_list=True), help="Comma list of metrics (default: deletion, insertion, aupc, "
        "noise, sparseness, keep, remove; plus pointing, energy with --boxes/--masks)")] = None,
    baseline: Annotated[str, typer.Option(metavar="NAME", autocompletion=complete.choices(("blur", "mean", "black")),
                                          help="Infill of removed pixels: blur, mean or black")] = "blur",
    boxes: Annotated[Path | None, typer.Option(metavar="FILE", help="Object boxes, JSON or CSV: image -> (left, "
                                               "top, right, bottom) in original pixels")] = None,
    masks: Annotated[Path | None, typer.Option(metavar="DIR", help="Folder of object masks named like the "
                                               "images")] = None,
    sanity: Annotated[str | None, typer.Option(metavar="NAME[,NAME...]", autocompletion=complete.completer(
        complete.sanity_names, comma_list=True), help="Sanity checks: randomization, perturbation (comma list; "
        "they recompute the maps)")] = None,
    fail_under: Annotated[list[str] | None, typer.Option(metavar="METRIC=X", help="Exit 4 when a method's mean "
                                                         "is below (repeatable)")] = None,
    fail_over: Annotated[list[str] | None, typer.Option(metavar="METRIC=X", help="Exit 4 when a method's mean "
                                                        "is above (repeatable)")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", "-o", metavar="DIR", rich_help_panel=o.OUTPUTS,
                                                  help="Output folder (default: the first run folder)")] = None,
    images: o.ImagesDir = None,
    device: o.Device = "auto",
    batch_size: o.BatchSize = "auto",
    shard: o.ShardOption = None,
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
    list_metrics: Annotated[bool, typer.Option("--list-metrics", help="List the metrics and exit")] = False,
) -> None:
    """Score the maps of explain runs (faithfulness, noise, sparseness, localisation, sanity) and gate CI.

    Writes evaluation.json, .csv and plots to --out (default: the first run folder); -q also hides the table."""
    from saliency_cli import api

    if list_metrics:
        _print_metrics(api.list_metrics(), json_out)
        return
    if not runs:
        raise UsageError("give at least one run folder (see saliency evaluate --help)")
    opts = api.EvaluateOptions(
        runs=list(runs), metrics=_names(metrics), baseline=baseline, boxes=boxes, masks=masks,
        sanity=_names(sanity, "--sanity") or [], fail_under=parse_bounds(fail_under, "--fail-under"),
        fail_over=parse_bounds(fail_over, "--fail-over"), device=device, batch_size=o.parse_batch_size(batch_size),
        out=o.out_path(out_dir), shard=shard, images=images,
    )
    progress = Progress("evaluating", enabled=not (quiet or json_out), unit="maps")
    try:
        ev = api.evaluate(opts, on_progress=progress.update)
    finally:
        progress.stop()
    _report(ev, quiet, json_out)
    for e in ev.errors:
        err.print(f"[red]error[/red] {e['image']} ({e['method']}): {e['error']}", markup=True)
    if ev.failures:
        for f in ev.failures:
            err.print(f"saliency: gate failed: {f.message()}", markup=False)
        raise typer.Exit(ExitCode.GATE)
    if ev.errors:
        err.print(f"saliency: {len(ev.errors)} map(s) could not be scored, {ev.scored} scored", markup=False)
        raise typer.Exit(ExitCode.PARTIAL)


def _report(ev: Any, quiet: bool, json_out: bool) -> None:
    """Warnings, the comparison table and the files written on stderr; with --json the summary on stdout."""
    for w in ev.warnings:
        warn(w)
    if not quiet:
        _print_table(ev)
        err.print(f"wrote {ev.files.get('json')}, {ev.files.get('csv')} and "
                  f"{sum(1 for k in ev.files if k not in ('json', 'csv'))} plots", markup=False)
    if json_out:
        from saliency_cli.writers import finite

        typer.echo(json.dumps(finite({"summary": ev.summary, "gates": [f.message() for f in ev.failures],
                                      "files": ev.files}), indent=2))


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.3f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95']:.3f}"
    return text + f" (n={stat.get('n', 0)})"  # the images this value is over (e.g. those with a box)


def comparison_rows(ev: Any) -> tuple[list[str], list[list[str]]]:
    """The comparison table as text: header (metric, then one column per method) and one row per metric,
    each cell `mean ± ci95 (n=images with a value)`, the best method's cell marked with `*`."""
    higher_is_better = ev.higher_is_better
    labels = list(ev.summary)
    header = ["metric", *labels]
    rows = []
    for n in ev.metrics + list(ev.sanity):
        stats = [ev.summary[label].get(n) for label in labels]
        means = [s["mean"] for s in stats if s and s.get("mean") is not None]
        best = (max(means) if higher_is_better(n) else min(means)) if len(means) > 1 else None
        cells = [_fmt(s) + (" *" if best is not None and s and s.get("mean") == best else "") for s in stats]
        rows.append([f"{n} {'↑' if higher_is_better(n) else '↓'}", *cells])
    return header, rows


def _print_table(ev: Any) -> None:
    header, rows = comparison_rows(ev)
    table(err, "saliency evaluate: mean ± 95 % CI over the n images with a value (↑ higher is better, ↓ lower; "
          "* best)", header, rows, right=tuple(range(1, len(header))))


def _metric_cells(r: dict[str, Any]) -> list[str]:
    cost = (str(r["forward_passes_per_image"]) if "forward_passes_per_image" in r
            else f"{r['map_recomputations_per_image']} maps")
    return [r["name"], r["family"], "higher" if r["higher_is_better"] else "lower", cost, r["summary"], r["paper"]]


def _print_metrics(rows: list[dict[str, Any]], json_out: bool) -> None:
    """`--list-metrics`: the rows as JSON on stdout, or a table."""
    listing(rows, json_out, "saliency evaluate metrics (cost: forward passes per image and method)",
            ["name", "family", "better", "cost", "summary", "paper"], _metric_cells)
