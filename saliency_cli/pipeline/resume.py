"""The index of finished work in an output folder: (image key, job config id, image sha256), and by content
(config id, sha256) alone.

A rerun into the same folder skips what this index holds; output names do not depend on the settings, so only
the latest record that wrote a file counts (not one whose files a later run overwrote).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saliency_cli.writers import read_manifests

Records = list[dict[str, Any]]


class FinishedIndex:
    """Earlier `ok` records by (key, config id, file digest) whose files all still exist."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.done: dict[tuple[str, str, str], Records] = {}
        self.by_content: dict[tuple[str, str], Records] = {}
        self.bad_lines = 0
        if enabled:
            self._read(out)

    def _read(self, out: Path) -> None:
        content = read_manifests(out)
        self.bad_lines = content.bad_lines
        claimed: set[str] = set()  # output files written by a later record
        for rec in reversed(content.records):
            if rec.get("status") != "ok":
                continue
            outputs = list((rec.get("outputs") or {}).values())
            latest = not claimed.intersection(outputs)
            claimed.update(outputs)
            if not latest or not rec.get("config") or not all((out / p).is_file() for p in outputs):
                continue
            self.done.setdefault((rec["key"], rec["config"], rec.get("sha256") or ""), []).insert(0, rec)
            if rec.get("sha256"):
                self.by_content.setdefault((rec["config"], rec["sha256"]), []).insert(0, rec)

    def get(self, key: str, config_id: str, digest: str) -> Records | None:
        """The finished records of one image and job (one per target), or None. Found by key, or else by content:
        the same bytes explained with the same settings under another key (the inputs were given differently,
        e.g. another folder was added and the common root moved) count as done, and their files are reused."""
        return self.done.get((key, config_id, digest)) or self.by_content.get((config_id, digest))
