"""The index of finished work in an output folder: the current `ok`/`skipped` records (current.py) by (image key,
job config id, image sha256), and by content (config id, sha256) alone.

A rerun into the same folder skips what this index holds. Only current records count: one whose files a later run
overwrote (other settings, same names) or deleted is history, and its job is done again.
"""

from __future__ import annotations

from pathlib import Path

from saliency_cli.runfolder.current import current
from saliency_cli.runfolder.records import Record, read_manifests

Records = list[Record]


class FinishedIndex:
    """Current finished records by (key, config id, file digest)."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.done: dict[tuple[str, str, str], Records] = {}
        self.by_content: dict[tuple[str, str], Records] = {}
        self.bad_lines = 0
        if enabled:
            self._read(out)

    def _read(self, out: Path) -> None:
        content = read_manifests(out)
        self.bad_lines = content.bad_lines
        for rec in current(content.records, out):
            if rec.status not in ("ok", "skipped") or not rec.config or not rec.outputs:
                continue
            self.done.setdefault((rec.key, rec.config, rec.sha256 or ""), []).append(rec)
            if rec.sha256:
                self.by_content.setdefault((rec.config, rec.sha256), []).append(rec)

    def get(self, key: str, config_id: str, digest: str) -> Records | None:
        """The finished records of one image and job (one per target), or None. Found by key, or else by content:
        the same bytes explained with the same settings under another key (the inputs were given differently,
        e.g. another folder was added and the common root moved) count as done, and their files are reused."""
        return self.done.get((key, config_id, digest)) or self.by_content.get((config_id, digest))
