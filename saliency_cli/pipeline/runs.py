"""Reading `explain` run folders back: run.json and the manifest's finished maps, method labels, the images and
maps they name, and the model they were made with."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_cli.data import decode, file_digest, image_seed, preprocess
from saliency_cli.errors import ModelError, SaliencyError, UsageError
from saliency_cli.models import LoadedModel, load_model_from_source
from saliency_cli.writers import read_manifests, run_record

PARAM_NOISE = {"seed", "sigma", "noise_absolute", "noise_relative"}  # per-run or per-image values that do not
# tell methods apart


@dataclass
class Row:
    """One map to score: a manifest record of a run, with its method label."""

    run: RunData
    record: dict[str, Any]
    label: str = ""

    @property
    def image(self) -> str:
        """The image path; a relative one is taken from the folder `explain` ran in (run.json's `cwd`)."""
        path = Path(str(self.record["image"]))
        cwd = self.run.info.get("cwd")
        return str(Path(cwd) / path if cwd and not path.is_absolute() else path)

    @property
    def target(self) -> int:
        return int(self.record["target"])


@dataclass
class RunData:
    """A run folder as read back: its run.json (`info`) and the rows of its usable manifest records."""

    folder: Path
    name: str
    info: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    bad_lines: int = 0  # manifest lines that were torn or malformed (skipped)

    @property
    def seed(self) -> int:
        return int((self.info.get("options") or {}).get("seed", 0) or 0)

    @property
    def score(self) -> str:
        return str((self.info.get("options") or {}).get("score") or "logit")


def asked_settings(params: dict[str, Any]) -> dict[str, Any]:
    """A record's params as the run asked for them: a value calibrated per image (`weight_noise` with
    `weight_noise_auto`) is `auto` again, so that every image of a run has the same settings."""
    out = dict(params)
    if out.pop("weight_noise_auto", False):
        out["weight_noise"] = "auto"
    return out


def _settings(record: dict[str, Any]) -> dict[str, Any]:
    """A record's hyper-parameters without those that differ per run or image (PARAM_NOISE, per-image `auto`)."""
    return {k: v for k, v in asked_settings(record.get("params") or {}).items() if k not in PARAM_NOISE}


def read_run(folder: Path) -> RunData:
    """run.json and the usable manifest records (status ok or skipped, with a .npy; the last record of an
    (image, method, settings, target) wins, as a re-run appends)."""
    try:
        info = json.loads(run_record(folder).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder}/run.json: cannot read it ({e})") from None
    if not isinstance(info, dict) or "model" not in info or "data_config" not in info:
        raise UsageError(f"{folder}/run.json: no model source or data config recorded")
    run = RunData(folder, folder.resolve().name or str(folder), info)
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    content = read_manifests(folder)
    run.bad_lines = content.bad_lines
    for rec in content.records:
        if rec.get("status") not in ("ok", "skipped") or not (rec.get("outputs") or {}).get("npy"):
            continue
        if rec.get("target") is None:
            continue
        ident = (rec.get("key"), rec.get("method"), json.dumps(_settings(rec), sort_keys=True, default=str),
                 rec.get("target"))
        latest[ident] = rec
    run.rows = [Row(run, rec) for rec in latest.values()]
    return run


def _label_settings(run: RunData) -> None:
    """Each row's label within its run: the method name, or `name[k=v,...]` (the settings that differ) when the
    run has several settings of that method (a noise sweep)."""
    settings: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in run.rows:
        params = _settings(row.record)
        settings[row.record["method"]][json.dumps(params, sort_keys=True, default=str)] = params
    for row in run.rows:
        method = row.record["method"]
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
    """The row's image, decoded and preprocessed with the run's data config; it must be the file the run saw."""
    path = Path(row.image)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SaliencyError(f"cannot read the image ({e.strerror or e}); manifest paths are relative to "
                            "the folder explain ran in") from None
    digest = file_digest(data)
    recorded = row.record.get("sha256")
    if recorded and recorded != digest:
        raise SaliencyError("the image file changed since the run (sha256 differs)")
    img = decode(data, data_config=cfg)
    x, box = preprocess(img, cfg)
    return LoadedImage(x.to(device), image_seed(row.run.seed, digest), img.info.get("original_size", img.size), box)


def load_map(row: Row, shape: tuple[int, int]) -> np.ndarray:
    """The stored map as (H, W) float32; a (C, H, W) map becomes sum_c |m_c|; another size is resized."""
    path = row.run.folder / row.record["outputs"]["npy"]
    try:
        m = np.load(path, allow_pickle=False).astype(np.float32)
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
