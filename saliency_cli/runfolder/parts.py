"""The shard parts of a run folder and `saliency merge OUT`: a shard of N > 1 writes `manifest.shard-I-of-N.jsonl`
and `run.shard-I-of-N.json`; merging makes them the single `manifest.jsonl` and `run.json` that tools expecting
one file read. Idempotent: a merged folder has no parts left, and merging it again changes nothing. Readers of
this package read every part anyway (records.read_manifests)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

from saliency_cli.errors import UsageError
from saliency_cli.runfolder.records import MANIFEST, Record, read_manifest, record_line
from saliency_cli.runfolder.runinfo import RUN, load_info, shard_run_records, write_info
from saliency_cli.writers import RunLock, write_bytes


def manifest_name(suffix: str = "") -> str:
    """The manifest's file name: `manifest.jsonl`, or a shard's `manifest.shard-I-of-N.jsonl`."""
    return f"manifest{suffix}.jsonl"


def _shard_parts(folder: Path) -> tuple[list[Path], list[Path]]:
    manifests = sorted(folder.glob("manifest.shard-*.jsonl"))
    return manifests, shard_run_records(folder)


def _summary(base: dict[str, Any], shards: list[dict[str, Any]], records: list[Record]) -> dict[str, Any]:
    """run.json of the merged folder: the first record's model, data config and options, every shard's own
    record under `shards`, counts from the merged manifest, the earliest start and the latest end."""
    summary = dict(base)
    counts = {"ok": 0, "error": 0, "skipped": 0}
    for rec in records:
        counts[rec.status] = counts.get(rec.status, 0) + 1
    every = [base, *shards] if "shards" not in base else [*base["shards"], *shards]
    summary["shards"] = [{k: s.get(k) for k in ("shard", "started", "finished", "counts", "interrupted", "device",
                                                "inputs")} for s in every if s.get("shard")]
    starts = [s["started"] for s in every if s.get("started")]
    ends = [s["finished"] for s in every if s.get("finished")]
    summary.update(counts=counts, started=min(starts) if starts else None, finished=max(ends) if ends else None,
                   interrupted=any(s.get("interrupted") for s in every))
    summary.pop("shard", None)
    return summary


def merge_folder(folder: Path) -> dict[str, Any]:
    """Merge the shard parts of `folder`; returns what was done. Refuses while a shard is still writing."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    manifests, runs = _shard_parts(folder)
    whole = folder / MANIFEST
    if not manifests and not runs:
        return {"merged": 0, "records": len(read_manifest(whole).records), "folder": str(folder)}
    with ExitStack() as stack:
        for lock in sorted(folder.glob(".saliency.lock*")):
            stack.enter_context(RunLock(lock))  # a shard still running holds its lock: OutputError, exit 1
        content = read_manifest(whole)
        records = list(content.records)
        for part in manifests:
            records += read_manifest(part).records
        write_bytes(whole, b"".join(record_line(rec) for rec in records))  # atomic: parts removed once it is whole
        shard_records = [load_info(path) for path in runs]
        existing = [load_info(folder / RUN)] if (folder / RUN).is_file() else []
        if existing:
            write_info(folder, _summary(existing[0], shard_records, records))
        elif shard_records:
            write_info(folder, _summary(shard_records[0], shard_records[1:], records))
        for path in [*manifests, *runs]:
            path.unlink()
    return {"merged": len(manifests), "records": len(records), "folder": str(folder)}
