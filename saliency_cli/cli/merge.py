"""`saliency merge OUT`: one `manifest.jsonl` and `run.json` from the parts the shards of a run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from saliency_cli.cli.console import err


def merge(folder: Annotated[Path, typer.Argument(help="Output folder of a sharded explain run")]) -> None:
    """Merge the shards' manifest parts and run records into manifest.jsonl and run.json (idempotent)."""
    from saliency_cli.api import merge as merge_folder

    done = merge_folder(folder)
    err.print(f"merged {done['merged']} manifest part(s): {done['records']} records in {folder}/manifest.jsonl",
              markup=False)
