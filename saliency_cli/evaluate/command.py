"""The `saliency evaluate` command: parse options, call `evaluate_runs`, print the table, gate.

Registered on the app by saliency_cli.cli (`_register_evaluate`). Does not import saliency_cli.cli (that
module imports this one while it is being set up). Data goes to stdout (`--json`), people's messages to
stderr; a failed gate exits 4 naming the metric, the method and the value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from saliency_cli.errors import UsageError
from saliency_cli.options import parse_batch_size

EXIT_GATE = 4
err = Console(stderr=True, highlight=False)


def parse_bounds(values: list[str] | None, option: str) -> dict[str, float]:
    """`metric=value` items (repeatable; commas allowed inside one) -> {metric: value}."""
    out: dict[str, float] = {}
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
            out[name.strip()] = bound
    return out


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    return names


def evaluate(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders of `saliency explain` (several: compared "
                                                       "side by side)", show_default=False)] = None,
    metrics: Annotated[str | None, typer.Option(help="Comma list of metrics (default: deletion, insertion, "
                                                "aupc, noise, sparseness, keep, remove; plus pointing, "
                                                "energy with --boxes/--masks)")] = None,
    baseline: Annotated[str, typer.Option(help="Infill of removed pixels: blur, mean or black")] = "blur",
    boxes: Annotated[Path | None, typer.Option(help="Object boxes, JSON or CSV: image -> (left, top, right, "
                                               "bottom) in original pixels")] = None,
    masks: Annotated[Path | None, typer.Option(help="Folder of object masks named like the images")] = None,
    sanity: Annotated[str | None, typer.Option(help="Sanity checks: randomization, perturbation (comma list; "
                                               "they recompute the maps)")] = None,
    fail_under: Annotated[list[str] | None, typer.Option(help="METRIC=VALUE: exit 4 when a method's mean is "
                                                         "below (repeatable)")] = None,
    fail_over: Annotated[list[str] | None, typer.Option(help="METRIC=VALUE: exit 4 when a method's mean is "
                                                        "above (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where evaluation.json/.csv and plots go "
                                             "(default: the first run folder)")] = None,
    device: Annotated[str, typer.Option(help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")] = "auto",
    batch_size: Annotated[str, typer.Option(help="Most inputs per forward pass, or auto")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no table")] = False,
    list_metrics: Annotated[bool, typer.Option("--list-metrics", help="List the metrics and exit")] = False,
) -> None:
    """Score the maps of explain runs (faithfulness, noise, sparseness, localisation, sanity) and gate CI."""
    from saliency_cli.evaluate.run import EvaluateOptions, evaluate_runs

    if list_metrics:
        _list_metrics(json_out)
        return
    if not runs:
        raise UsageError("give at least one run folder (see saliency evaluate --help)")
    batch = parse_batch_size(batch_size)
    opts = EvaluateOptions(
        runs=list(runs), metrics=_names(metrics), baseline=baseline, boxes=boxes, masks=masks,
        sanity=_names(sanity) or [], fail_under=parse_bounds(fail_under, "--fail-under"),
        fail_over=parse_bounds(fail_over, "--fail-over"), device=device, batch_size=batch, out=out,
    )
    progress = _Progress(not (quiet or json_out) and err.is_terminal)
    try:
        ev = evaluate_runs(opts, on_progress=progress.update)
    finally:
        progress.stop()
    for w in ev.warnings:
        err.print(f"[yellow]warning[/yellow] {w}", markup=True)
    if not quiet:
        _print_table(ev)
        err.print(f"wrote {ev.files.get('json')}, {ev.files.get('csv')} and "
                  f"{sum(1 for k in ev.files if k not in ('json', 'csv'))} plots", markup=False)
    if json_out:
        from saliency_cli.evaluate.report import finite

        typer.echo(json.dumps(finite({"summary": ev.summary, "gates": [f.message() for f in ev.failures],
                                      "files": ev.files}), indent=2))
    if ev.failures:
        for f in ev.failures:
            err.print(f"saliency: gate failed: {f.message()}", markup=False)
        raise typer.Exit(EXIT_GATE)


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:.3f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95']:.3f}"
    return text


def comparison_rows(ev: Any) -> tuple[list[str], list[list[str]]]:
    """The comparison table as text: header (metric, then one column per method) and one row per metric,
    each cell `mean ± ci95`, the best method's cell marked with `*`."""
    from saliency_cli.evaluate.run import higher_is_better

    labels = list(ev.summary)
    header = ["metric", *labels]
    rows = []
    for n in ev.metrics + list(ev.sanity):
        stats = [ev.summary[label].get(n) for label in labels]
        means = [s["mean"] for s in stats if s and s.get("mean") is not None]
        best = (max(means) if higher_is_better(n) else min(means)) if len(means) > 1 else None
        cells = [_fmt(s) + (" *" if best is not None and s and s.get("mean") == best else "") for s in stats]
        rows.append([f"{n} {'↑' if higher_is_better(n) else '↓'}", *cells])
    counts = [str(max((s.get("n", 0) for s in ev.summary[label].values()), default=0)) for label in labels]
    rows.append(["images", *counts])
    return header, rows


def _print_table(ev: Any) -> None:
    from rich.table import Table

    header, rows = comparison_rows(ev)
    table = Table(title="saliency evaluate: mean ± 95 % CI over images (↑ higher is better, ↓ lower; * best)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    err.print(table)


def _list_metrics(json_out: bool) -> None:
    from saliency_cli.evaluate.base import REGISTRY
    from saliency_cli.evaluate.sanity import SANITY

    rows: list[dict[str, Any]] = [
        {"name": m.name, "family": m.family, "summary": m.summary, "higher_is_better": m.higher_is_better,
         "defaults": m.defaults, "forward_passes_per_image": m.cost(m.defaults), "default": m.default,
         "needs_regions": m.needs_regions, "paper": m.paper} for m in REGISTRY.values()]
    rows += [{"name": s.name, "family": "sanity", "summary": s.summary, "higher_is_better": s.higher_is_better,
              "defaults": s.defaults, "map_recomputations_per_image": s.cost(s.defaults), "default": False,
              "needs_regions": False, "paper": s.paper} for s in SANITY.values()]
    if json_out:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title="saliency evaluate metrics (cost: forward passes per image and method)")
    for col in ("name", "family", "better", "cost", "summary", "paper"):
        table.add_column(col)
    for r in rows:
        cost = (str(r["forward_passes_per_image"]) if "forward_passes_per_image" in r
                else f"{r['map_recomputations_per_image']} maps")
        table.add_row(r["name"], r["family"], "higher" if r["higher_is_better"] else "lower", cost, r["summary"],
                      r["paper"])
    Console().print(table)


class _Progress:
    """A rich progress bar on stderr over the maps scored, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                console=err)
            self.task = self.bar.add_task("evaluate", total=total)
            self.bar.start()
        self.bar.update(self.task, completed=done)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
