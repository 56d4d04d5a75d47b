"""`saliency report`: parse the options, call `api.report`, say where the page is.

The page is static and self-contained (index.html + thumbs/ under --out); `--json` prints what was written on
stdout. No torch at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from saliency_cli.cli import options as o
from saliency_cli.cli.console import Progress, err, warn

Runs = Annotated[list[Path], typer.Argument(help="Run folders of `saliency explain` (several: one page, a column "
                                            "per run and method)", show_default=False)]


def report(
    runs: Runs,
    out_dir: Annotated[str | None, typer.Option("--out", "-o", metavar="DIR",
                                                help="Report folder (default: the first run folder); the files "
                                                "it links are copied into it (see --link)")] = None,
    comparison: Annotated[Path | None, typer.Option(help="A comparison.json of `saliency compare` to show "
                                                    "(default: any in the run folders)")] = None,
    page_size: Annotated[int, typer.Option(help="Rows a page")] = 50,
    thumb_size: Annotated[int, typer.Option(help="Thumbnail width, pixels")] = 160,
    images: o.ImagesDir = None,
    link: Annotated[bool, typer.Option("--link", help="Link the runs' overlays, maps and images where they are "
                                       "instead of copying them into --out (the page is then not publishable "
                                       "alone, and says so)")] = False,
    json_out: o.JsonOut = False,
    quiet: o.Quiet = False,
) -> None:
    """A static HTML page over explain runs (index.html + thumbs/), sortable, filterable, works offline.

    A row per image and class, a thumbnail per method linking to the overlay and the .npy, the metrics of
    `saliency evaluate` and the comparisons of `saliency compare` when their files are in the run folders."""
    from saliency_cli import api

    progress = Progress("thumbnails", enabled=not (quiet or json_out), unit="thumbnails")
    try:
        result = api.report(list(runs), out=o.out_path(out_dir), comparison=comparison, page_size=page_size,
                            thumb_size=thumb_size, link=link, on_progress=progress.update, images=images)
    finally:
        progress.stop()
    for w in result.warnings:
        warn(w)
    if json_out:
        typer.echo(json.dumps({"index": str(result.path), "rows": result.rows, "columns": result.columns,
                               "thumbnails": result.thumbnails, "errors": result.errors}, indent=2))
    elif not quiet:
        err.print(f"wrote {result.path} ({result.rows} rows, {len(result.columns)} method columns, "
                  f"{result.thumbnails} thumbnails, {result.errors} failed maps listed)", markup=False)
