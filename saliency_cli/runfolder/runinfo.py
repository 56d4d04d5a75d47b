"""The run record: `run.json` (or a shard's `run.shard-I-of-N.json`), the one place it is read and written.

One error policy: a run record that cannot be read or is not a JSON object is a usage error naming the file;
callers that reload the model also need its `model` and `data_config` (`require_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from saliency_cli.errors import UsageError
from saliency_cli.writers import write_json

RUN = "run.json"


def run_name(suffix: str = "") -> str:
    """The run record's file name: `run.json`, or a shard's `run.shard-I-of-N.json`."""
    return f"run{suffix}.json"


def shard_run_records(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("run.shard-*.json"))


def run_record_path(folder: Path) -> Path:
    """`run.json`, or for a sharded run not merged yet the first shard's record (every shard records the same
    model, data config and options)."""
    whole = Path(folder) / RUN
    if whole.is_file():
        return whole
    parts = shard_run_records(folder)
    return parts[0] if parts else whole


def has_run_record(folder: Path) -> bool:
    return run_record_path(folder).is_file()


def load_info(path: Path) -> dict[str, Any]:
    """One run record file as a dict; UsageError when it cannot be read or is not an object."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read it ({e}); is it a `saliency explain` output folder?") from None
    if not isinstance(info, dict):
        raise UsageError(f"{path}: not a JSON object")
    return info


def read_info(folder: Path, require_model: bool = False) -> dict[str, Any]:
    """The run record of a run folder (see `run_record_path`)."""
    path = run_record_path(folder)
    info = load_info(path)
    if require_model and ("model" not in info or "data_config" not in info):
        raise UsageError(f"{path}: no model source or data config recorded")
    return info


def write_info(folder: Path, info: dict[str, Any], suffix: str = "") -> Path:
    """Write (atomically) the run record of a run or of one shard."""
    path = Path(folder) / run_name(suffix)
    write_json(path, info)
    return path
