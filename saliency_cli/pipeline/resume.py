"""The index of finished work in an output folder, keyed by content: (image key, job config id, image sha256).

A rerun into the same folder skips what this index holds; output names do not depend on the settings, so only
the latest record that wrote a file counts (not one whose files a later run overwrote).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saliency_cli.writers import read_manifest

Records = list[dict[str, Any]]


class FinishedIndex:
    """Earlier `ok` records by (key, config id, file digest) whose files all still exist."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.done: dict[tuple[str, str, str], Records] = {}
        if enabled:
            self._read(out)

    def _read(self, out: Path) -> None:
        claimed: set[str] = set()  # output files written by a later record
        for rec in reversed(read_manifest(out / "manifest.jsonl")):
            if rec.get("status") != "ok":
                continue
            outputs = list((rec.get("outputs") or {}).values())
            latest = not claimed.intersection(outputs)
            claimed.update(outputs)
            if not latest or not rec.get("config") or not all((out / p).is_file() for p in outputs):
                continue
            self.done.setdefault((rec["key"], rec["config"], rec.get("sha256", "")), []).insert(0, rec)

    def get(self, key: str, config_id: str, digest: str) -> Records | None:
        """The finished records of one image and job (one per target), or None."""
        return self.done.get((key, config_id, digest))
