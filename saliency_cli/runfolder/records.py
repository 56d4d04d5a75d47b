"""The manifest: one JSON line per (image, method, target) record, its schema as a typed object, and the only code
that writes or parses those lines.

A line is parsed into a `Record` when it is an object with the required keys of the right types, a known status,
`outputs` an object of strings and `target` an integer or null; any other line (torn by a crash, not UTF-8,
hand-edited) is skipped and counted, never fatal. Keys this version does not know are kept (`extra`) and written
back unchanged, so a merge or a rerun never drops what a newer or older version recorded.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from saliency_cli.writers import finite

MANIFEST = "manifest.jsonl"
STATUSES = ("ok", "error", "skipped")
REQUIRED = {"image": str, "key": str, "status": str, "method": str}
ORDER = ("image", "key", "status", "error", "method", "params", "target", "label", "score", "outputs", "crop_box",
         "map_shape", "seconds", "sha256", "config")
OPTIONAL = ("name", "npy_sha256", "image_rel", "tag")  # written when known


@dataclass
class Record:
    """One manifest line. `image`: the path as given to explain; `key`: the path relative to the inputs' common
    root (output names mirror it); `outputs`: {"npy", "overlay"} relative to the run folder; `name`: the output
    name of the map (`method`, `method+base`, `.noiseL`, `.classC`), the slot the record fills in the folder;
    `npy_sha256`: the sha256 of the .npy file's bytes as written; `image_rel`: the image path relative to the run
    folder (how a moved folder finds its images); `tag`: the `--tag` label of the configuration."""

    image: str
    key: str
    status: str
    method: str
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    target: int | None = None
    label: str | None = None
    score: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    crop_box: list[float] | None = None
    map_shape: list[int] | None = None
    seconds: float = 0.0
    sha256: str | None = None
    config: str | None = None
    name: str | None = None
    npy_sha256: str | None = None
    image_rel: str | None = None
    tag: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know (e.g. `stats`)

    @property
    def npy(self) -> str | None:
        return self.outputs.get("npy")

    @property
    def overlay(self) -> str | None:
        return self.outputs.get("overlay")

    @property
    def asked(self) -> dict[str, Any]:
        """The params as the run asked for them: a value calibrated on each image (`weight_noise` with
        `weight_noise_auto`) is `auto` again, so that every image of one run has the same settings."""
        out = dict(self.params)
        if out.pop("weight_noise_auto", False):
            out["weight_noise"] = "auto"
        return out

    def to_json(self) -> dict[str, Any]:
        """The line's object: the known keys in schema order (`name` only when known), then the others."""
        out = {k: getattr(self, k) for k in ORDER}
        out.update({k: getattr(self, k) for k in OPTIONAL if getattr(self, k) is not None})
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any) -> Record | None:
        """The record of a parsed line, or None when the line is not a usable record."""
        if not isinstance(data, dict):
            return None
        if any(not isinstance(data.get(k), t) for k, t in REQUIRED.items()) or data["status"] not in STATUSES:
            return None
        outputs = data.get("outputs") or {}
        if not isinstance(outputs, dict) or not all(isinstance(v, str) for v in outputs.values()):
            return None
        target = data.get("target")
        if target is not None and (not isinstance(target, int) or isinstance(target, bool)):
            return None
        params = data.get("params") or {}
        if not isinstance(params, dict):
            return None
        known = {f.name for f in fields(cls)} - {"extra"}
        score = data.get("score")
        return cls(image=data["image"], key=data["key"], status=data["status"], method=data["method"],
                   error=_str(data.get("error")), params=params, target=target, label=_str(data.get("label")),
                   score=float(score) if isinstance(score, int | float) and not isinstance(score, bool) else None,
                   outputs=dict(outputs), crop_box=_list(data.get("crop_box")), map_shape=_list(data.get("map_shape")),
                   seconds=float(data["seconds"]) if isinstance(data.get("seconds"), int | float) else 0.0,
                   sha256=_str(data.get("sha256")), config=_str(data.get("config")),
                   **{k: _str(data.get(k)) for k in OPTIONAL},
                   extra={k: v for k, v in data.items() if k not in known})


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _list(value: Any) -> list[Any] | None:
    return list(value) if isinstance(value, list) else None


def record_line(rec: Record) -> bytes:
    """The manifest line of a record (NaN/Inf as null: JSON has none), newline included."""
    return json.dumps(finite(rec.to_json()), default=str, allow_nan=False).encode("utf-8") + b"\n"


def parse_lines(data: bytes) -> tuple[list[Record], int]:
    """The records of a manifest's bytes and the number of lines that were not usable records."""
    records, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = Record.from_json(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            rec = None
        if rec is None:
            bad += 1
        else:
            records.append(rec)
    return records, bad


@dataclass
class ManifestContent:
    """The usable records of one or more manifest parts, in order, and how many lines were not usable."""

    records: list[Record] = field(default_factory=list)
    bad_lines: int = 0
    parts: list[Path] = field(default_factory=list)


def manifest_parts(folder: Path) -> list[Path]:
    """Every manifest part of a run folder: `manifest.jsonl` and the shards' `manifest.shard-*.jsonl`."""
    return sorted(p for p in Path(folder).glob("manifest*.jsonl") if p.is_file())


def read_manifest(path: Path) -> ManifestContent:
    """The usable records of one manifest file (none when it does not exist)."""
    content = ManifestContent(parts=[path])
    if path.is_file():
        content.records, content.bad_lines = parse_lines(path.read_bytes())
    return content


def read_manifests(folder: Path) -> ManifestContent:
    """The records of every manifest part of `folder`, part after part."""
    content = ManifestContent()
    for part in manifest_parts(folder):
        one = read_manifest(part)
        content.records.extend(one.records)
        content.bad_lines += one.bad_lines
        content.parts.append(part)
    return content


class Manifest:
    """Appends one line per record, flushed and fsynced; the caller appends a record after its files exist.

    A record is sanitised (NaN/Inf -> null) rather than refused, so no record is ever lost; a manifest whose last
    line was torn by a crash gets a newline first, so the next record starts on a line of its own.
    """

    def __init__(self, path: Path, echo: IO[str] | None = None) -> None:
        self.path = path
        self.echo = echo
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()
        if self._file.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write(b"\n")
        self.echo_broken = False

    def append(self, record: Record) -> None:
        line = record_line(record)
        with self._lock:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
            if self.echo is not None and not self.echo_broken:
                try:
                    self.echo.write(line.decode("utf-8"))
                    self.echo.flush()
                except (BrokenPipeError, ValueError):  # `| head` closed the pipe: the manifest still has it all
                    self.echo_broken = True

    def close(self) -> None:
        self._file.close()
