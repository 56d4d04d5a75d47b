"""comparison.json and comparison.csv: written by `saliency compare`, read back by `saliency report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saliency_cli.runfolder.evaluation import read_result
from saliency_cli.writers import finite, write_bytes

COMPARISON = "comparison.json"


def write_comparison(out: Path, data: dict[str, Any], csv: str) -> dict[str, str]:
    """Write comparison.json (`data`) and comparison.csv (`csv`) under `out`; returns {"json", "csv": path}."""
    files = {"json": str(out / COMPARISON), "csv": str(out / "comparison.csv")}
    write_bytes(Path(files["json"]), json.dumps(finite(data), indent=2, default=str, allow_nan=False).encode())
    write_bytes(Path(files["csv"]), csv.encode())
    return files


def read_comparison(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    return read_result(path, warnings)
