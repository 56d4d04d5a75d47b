"""`saliency compare RUN_A RUN_B`: parse the options, call `api.compare`, print the table, gate.

The table (most changed first) goes to stderr, `--json` puts the result on stdout; a failed gate exits 4
(ExitCode.GATE) naming the image, the method and the value. No torch at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from saliency_cli.cli import options as o
from saliency_cli.cli.console import Progress, err, table, warn
from saliency_cli.cli.evaluate import parse_bounds
from saliency_cli.errors import ExitCode

TABLE_ROWS = 20  # rows of the table on stderr; comparison.csv has them all


def compare(
    run_a: Annotated[Path, typer.Argument(help="The reference run folder (e.g. the model before a retrain)",
                                          show_default=False)],
    run_b: Annotated[Path, typer.Argument(help="The run folder under review (e.g. after the retrain)",
                                          show_default=False)],
    out_dir: Annotated[str | None, typer.Option("--out", "-o", metavar="DIR",
                                                help="Where comparison.json, .csv and the strips "
                                                 "go (default: RUN_B)")] = None,
    fail_under: Annotated[list[str] | None, typer.Option(help="spearman=VALUE or iou=VALUE: exit 4 when ANY image's "
                                                         "value for a method is below (per image, not the mean; "
                                                         "repeatable)")] = None,
    strips: Annotated[int, typer.Option(help="Side-by-side PNGs for this many of the most changed maps")] = 5,
    pool: Annotated[int, typer.Option(help="Maps are average-pooled to POOL x POOL before ranking (robust to "
                                      "pixel noise)")] = 56,
    top: Annotated[float, typer.Option(help="Fraction of the pixels in the top region of the IoU")] = 0.1,
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
) -> None:
    """How much the maps changed between two runs, per image and method; gates CI (exit 4).

    For each image both runs explained (same file sha256, else same key) and each method: the Spearman rank
    correlation of the map magnitudes average-pooled to --pool x --pool, and the IoU of their top --top regions.

    Writes comparison.json, comparison.csv and strips of the most changed images; `saliency report RUN_B` shows
    them. Gates: --fail-under spearman=0.8 fails (exit 4) when any image's value is below 0.8."""
    from saliency_cli import api

    bounds = parse_bounds(fail_under, "--fail-under")
    progress = Progress("comparing", enabled=not (quiet or json_out), unit="maps")
    try:
        cmp = api.compare(run_a, run_b, out=o.out_path(out_dir), fail_under=bounds, strips=strips, pool=pool,
                          top=top, on_progress=progress.update)
    finally:
        progress.stop()
    for w in cmp.warnings:
        warn(w)
    if not quiet:
        _print_table(cmp)
        err.print(f"wrote {cmp.files['json']}, {cmp.files['csv']} and {len(cmp.files) - 2} strips", markup=False)
    if json_out:
        data = cmp.to_json()
        typer.echo(json.dumps({"summary": data["summary"], "gates": [f.message() for f in cmp.failures],
                               "files": cmp.files, "pairs": data["pairs"]}, indent=2))
    if cmp.failures:
        for f in cmp.failures:
            err.print(f"saliency: gate failed: {f.message()}", markup=False)
        raise typer.Exit(ExitCode.GATE)


def _num(v: Any) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def _print_table(cmp: Any) -> None:
    """The most changed pairs first (TABLE_ROWS of them), then the per-method means."""
    rows = [[p.key, p.method, _num(p.spearman), _num(p.iou)] for p in cmp.pairs[:TABLE_ROWS]]
    if len(cmp.pairs) > TABLE_ROWS:
        rows.append([f"... {len(cmp.pairs) - TABLE_ROWS} more in comparison.csv", "", "", ""])
    rows += [["mean", method, _num(st["spearman"]["mean"]), _num(st["iou"]["mean"])]
             for method, st in cmp.summary.items()]
    table(err, f"saliency compare: {cmp.run_a.name} -> {cmp.run_b.name}, most changed first (Spearman of pooled "
          f"|map|; IoU of the top {100 * cmp.options['top']:g} %)", ["image", "method", "spearman", "iou"], rows,
          right=(2, 3))
    for line in cmp.differences.get("sentences", []):  # besides the maps: models, preprocessing, settings
        err.print(f"note: {line}", markup=False)
    if cmp.only_a or cmp.only_b:
        err.print(f"{len(cmp.only_a)} maps only in {cmp.run_a.folder}, {len(cmp.only_b)} only in {cmp.run_b.folder}",
                  markup=False)
