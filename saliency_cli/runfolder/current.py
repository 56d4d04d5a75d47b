"""The one rule for what a run folder holds now.

A record fills a slot: (image key, output name), the name being the method (with its `+base`), `.noiseL` in a
sweep and `.classC` with `--target topk:K`, i.e. exactly the file names `KEY.NAME.npy` / `.png`. Reruns append
records and overwrite files of the same name, so for each slot the LAST record written is the current one, and a
record that wrote files is current only while its files exist. Every earlier record of the slot (other
settings, another target, an error that a later run fixed) is history: kept in the manifest, never shown or
scored. An error without a target (the image could not be read, the method failed) is also history once a later
record of the same image and job (any class) exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from saliency_cli.runfolder.records import Record

_CLASS = re.compile(r"\.class\d+$")


def slot_name(rec: Record) -> str:
    """The output name of a record: recorded (`name`), else read off its .npy path, else (an old error record)
    the method with its base."""
    if rec.name:
        return rec.name
    npy = rec.npy
    if npy and npy.startswith(rec.key + ".") and npy.endswith(".npy"):
        return npy[len(rec.key) + 1:-len(".npy")]
    base = rec.params.get("base")
    return rec.method + ("" if base in (None, "gradient") else f"+{base}")


def slot(rec: Record) -> tuple[str, str]:
    return rec.key, slot_name(rec)


def job_name(name: str) -> str:
    """The name without its `.classC` (the job that made the map)."""
    return _CLASS.sub("", name)


def current(records: list[Record], folder: Path) -> list[Record]:
    """The current record of every slot of the folder, in manifest order (see the module docstring)."""
    folder = Path(folder)
    seen: set[tuple[str, str]] = set()
    jobs: set[tuple[str, str]] = set()
    out: list[Record] = []
    for rec in reversed(records):
        key, name = slot(rec)
        if (key, name) in seen:
            continue
        if rec.status == "error" and rec.target is None and (key, job_name(name)) in jobs:
            continue
        seen.add((key, name))
        jobs.add((key, job_name(name)))
        if rec.outputs and not all((folder / p).is_file() for p in rec.outputs.values()):
            continue  # its files are gone: the folder holds nothing for this slot
        out.append(rec)
    out.reverse()
    return out
