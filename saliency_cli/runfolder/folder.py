"""A run folder read back: run.json and the current records as rows, their method labels, the images and maps
they name, and the model they were made with."""

from __future__ import annotations

import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_cli.data import decode, file_digest, image_seed, preprocess
from saliency_cli.errors import ModelError, SaliencyError, UsageError
from saliency_cli.models import LoadedModel, load_model_from_source
from saliency_cli.runfolder.current import current
from saliency_cli.runfolder.records import Record, manifest_parts, read_manifests
from saliency_cli.runfolder.runinfo import read_info

PARAM_NOISE = {"seed", "sigma", "noise_absolute", "noise_relative"}  # per-run or per-image values that do not
# tell methods apart


@dataclass
class Row:
    """One map to score: a manifest record of a run, with its method label."""

    run: RunData
    record: Record
    label: str = ""
    npy_sha256: str | None = None  # of the .npy file as read (load_map)

    @cached_property
    def image(self) -> str:
        """The image path: the first of `image_candidates` that exists (else the path as recorded); found once."""
        candidates = image_candidates(self)
        return str(next((p for p in candidates if p.is_file()), candidates[0]))

    @property
    def target(self) -> int:
        assert self.record.target is not None
        return int(self.record.target)


@dataclass
class RunData:
    """A run folder as read back: its run.json (`info`) and the rows of its usable manifest records."""

    folder: Path
    name: str
    info: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    bad_lines: int = 0  # manifest lines that were torn or malformed (skipped)
    images: Path | None = None  # `--images DIR`: where the inputs' common root is now (DIR/KEY)

    @property
    def seed(self) -> int:
        return int((self.info.get("options") or {}).get("seed", 0) or 0)

    @property
    def score(self) -> str:
        return str((self.info.get("options") or {}).get("score") or "logit")


def _settings(record: Record) -> dict[str, Any]:
    """A record's hyper-parameters without those that differ per run or image (PARAM_NOISE, per-image `auto`)."""
    return {k: v for k, v in record.asked.items() if k not in PARAM_NOISE}


def image_candidates(row: Row) -> list[Path]:
    """Where a row's image may be, in order: relative to the run folder as recorded (`image_rel`: the folder and
    its images moved together), the path as given to explain (a relative one from run.json's `cwd`), and
    `--images DIR` / key (the inputs' common root is DIR now)."""
    rec, run = row.record, row.run
    path = Path(rec.image)
    cwd = run.info.get("cwd")
    given = Path(cwd) / path if cwd and not path.is_absolute() else path
    found = [Path(os.path.normpath(run.folder / rec.image_rel))] if rec.image_rel else []
    found.append(given)
    if run.images is not None:
        found.append(run.images / rec.key)
    return list(dict.fromkeys(found))


def read_run(folder: Path, *, maps_only: bool = True, require_model: bool = True,
             images: Path | None = None) -> RunData:
    """run.json and the current records of the folder (`current.current`): with `maps_only` only those with a
    map (status ok or skipped, a .npy and a target), else every status. `images`: see RunData.images."""
    folder = Path(folder)
    if not folder.is_dir() or not manifest_parts(folder):
        raise UsageError(f"{folder} is not an explain run folder (no manifest.jsonl)")
    info = read_info(folder, require_model=require_model)
    run = RunData(folder, folder.resolve().name or str(folder), info, images=None if images is None else Path(images))
    content = read_manifests(folder)
    run.bad_lines = content.bad_lines
    records = current(content.records, folder)
    if maps_only:
        records = [r for r in records if r.status in ("ok", "skipped") and r.npy and r.target is not None]
    run.rows = [Row(run, rec) for rec in records]
    return run


def method_label(rec: Record) -> str:
    """A record's method as shown: the method name, `name@TAG` for a configuration given `--tag TAG`."""
    return rec.method + ("" if rec.tag is None else f"@{rec.tag}")


def _label_settings(run: RunData) -> None:
    """Each row's label within its run: the method label (`method_label`), or `name[k=v,...]` (the settings that
    differ) when the run has several settings of that method (a noise sweep)."""
    settings: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in run.rows:
        params = _settings(row.record)
        settings[method_label(row.record)][json.dumps(params, sort_keys=True, default=str)] = params
    for row in run.rows:
        method = method_label(row.record)
        variants = settings[method]
        if len(variants) == 1:
            row.label = method
            continue
        params = _settings(row.record)
        differing = sorted(k for k in set().union(*(p.keys() for p in variants.values()))
                           if len({json.dumps(p.get(k), default=str) for p in variants.values()}) > 1)
        row.label = f"{method}[{','.join(f'{k}={params.get(k)}' for k in differing)}]"


def assign_labels(runs: list[RunData]) -> None:
    """Method labels: the method name; `name[k=v,...]` when one run has several settings of a method (a
    noise sweep); prefixed with the run folder's name when several runs share a label."""
    for run in runs:
        _label_settings(run)
    owners: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        for row in run.rows:
            owners[row.label].add(str(run.folder))
    names = Counter(run.name for run in runs)
    for run in runs:
        prefix = run.name if names[run.name] == 1 else str(run.folder)
        for row in run.rows:
            if len(owners[row.label]) > 1:
                row.label = f"{prefix}/{row.label}"


def reload_model(run: RunData, device: torch.device, cache: dict[str, LoadedModel]) -> LoadedModel:
    """The model a run was made with (run.json's source and data config), loaded once per source into `cache`."""
    source = run.info["model"]
    key = json.dumps(source, sort_keys=True, default=str)
    if key not in cache:
        try:
            cache[key] = load_model_from_source(source, run.info["data_config"], device)
        except ModelError as e:
            raise ModelError(f"{run.folder}/run.json: {e}") from None
    return cache[key]


@dataclass
class LoadedImage:
    """An image of a run, preprocessed again: x (C, H, W) on the device, its generator seed (run seed and file
    bytes), its original (width, height) and the crop box the model saw."""

    x: torch.Tensor
    seed: int
    size: tuple[int, int]
    box: list[float]


def load_image(row: Row, cfg: dict[str, Any], device: torch.device) -> LoadedImage:
    """The row's image, decoded and preprocessed with the run's data config: the first of `image_candidates`
    whose bytes have the recorded sha256 (the file the run saw)."""
    data, digest = _image_bytes(row)
    img = decode(data, data_config=cfg)
    x, box = preprocess(img, cfg)
    return LoadedImage(x.to(device), image_seed(row.run.seed, digest), img.info.get("original_size", img.size), box)


def _image_bytes(row: Row) -> tuple[bytes, str]:
    recorded = row.record.sha256
    changed = []
    for path in image_candidates(row):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        digest = file_digest(data)
        if not recorded or recorded == digest:
            return data, digest
        changed.append(str(path))
    if changed:
        raise SaliencyError(f"the image file changed since the run (sha256 differs): {', '.join(changed)}")
    tried = ", ".join(str(p) for p in image_candidates(row))
    raise SaliencyError(f"cannot find the image (tried {tried}); if the run folder or the images moved, give "
                        "--images DIR (the folder that holds the images under their keys)")


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, None when it cannot be read."""
    try:
        return file_digest(path.read_bytes())
    except OSError:
        return None


def load_map(row: Row, shape: tuple[int, int]) -> np.ndarray:
    """The stored map as (H, W) float32; a (C, H, W) map becomes sum_c |m_c|; another size is resized. Sets
    `row.npy_sha256` to the sha256 of the file's bytes: what a result about this map is about."""
    path = row.run.folder / str(row.record.npy)
    try:
        data = path.read_bytes()
        m = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
        row.npy_sha256 = file_digest(data)
    except (OSError, ValueError) as e:
        raise SaliencyError(f"cannot read the map {path} ({e})") from None
    if m.ndim == 3:
        m = np.abs(m).sum(0)
    if m.ndim != 2:
        raise SaliencyError(f"the map {path} has shape {m.shape}, expected (H, W) or (C, H, W)")
    if not np.isfinite(m).all():
        raise SaliencyError(f"the map {path} is not finite")
    if m.shape != shape:
        t = torch.from_numpy(m)[None, None]
        m = torch.nn.functional.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    return m
