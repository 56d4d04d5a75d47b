"""`evaluate_runs(...)`: score the maps of one or more `explain` runs, usable from Python without the CLI.

run folders -> run.json (model source, data config, seed) + manifest.jsonl (image, target, .npy per method)
            -> reload the model and the images -> groups of images: every map metric batched over all rows
               (image x method) of the group; sanity checks recompute the maps with the run's method
            -> per-image values, per-method means with 95 % confidence intervals, mean curves, gates
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_cli.data import decode, file_digest, image_seed, input_bounds, preprocess
from saliency_cli.errors import ModelError, SaliencyError, UsageError
from saliency_cli.evaluate.base import BASELINES, REGISTRY, Batch, Scores, mean_ci95
from saliency_cli.evaluate.localisation import (
    box_region,
    index_masks,
    lookup,
    mask_region,
    read_boxes,
)
from saliency_cli.evaluate.sanity import SANITY, perturbation, randomization
from saliency_cli.methods import REGISTRY as METHODS
from saliency_cli.methods.base import Context, Method
from saliency_cli.models import LoadedModel, load_model, resolve_device
from saliency_cli.oracle import GradientOracle
from saliency_cli.reduce import reduce_channels
from saliency_cli.writers import read_manifest

Progress = Callable[[int, int], None]


@dataclass
class EvaluateOptions:
    """Everything `saliency evaluate` takes.

    metrics: names from the metric registry (None: the default set, plus pointing and energy when regions
    are given). metric_options: per-metric overrides of the registry defaults, e.g. {"deletion": {"steps":
    100}}; sanity_options the same for the sanity checks. fail_under / fail_over: metric -> bound on every
    method's mean. out: where evaluation.json/.csv and the plots go (default: the first run folder).
    """

    runs: list[Path]
    metrics: list[str] | None = None
    baseline: str = "blur"
    boxes: Path | None = None
    masks: Path | None = None
    sanity: list[str] = field(default_factory=list)
    fail_under: dict[str, float] = field(default_factory=dict)
    fail_over: dict[str, float] = field(default_factory=dict)
    device: str = "auto"
    batch_size: int | None = None  # None: auto
    out: Path | None = None
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    sanity_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_size: int = 8  # images held in memory at once
    write: bool = True
    plots: bool = True


@dataclass
class Failure:
    """A gate that failed: the mean of `metric` for `method` is on the wrong side of `bound`."""

    metric: str
    method: str
    value: float | None
    bound: float
    kind: str  # "under" (--fail-under) or "over" (--fail-over)

    def message(self) -> str:
        if self.value is None:
            return f"{self.metric}: no value for {self.method} (gate --fail-{self.kind} {self.metric}={self.bound:g})"
        sign = "<" if self.kind == "under" else ">"
        return f"{self.metric} of {self.method} is {self.value:.4g} {sign} {self.bound:g} (--fail-{self.kind})"


@dataclass
class Evaluation:
    """The result: rows per image and method, summaries, mean curves, sanity curves, gate failures."""

    images: list[dict[str, Any]]
    summary: dict[str, dict[str, dict[str, Any]]]
    curves: dict[str, dict[str, Any]]
    sanity: dict[str, dict[str, dict[str, Any]]]
    metrics: list[str]
    timing: dict[str, float]
    failures: list[Failure]
    warnings: list[str]
    info: dict[str, Any]
    out: Path
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        meta = {name: _metadata(name, self.info) for name in self.metrics + list(self.sanity)}
        return {"runs": self.info["runs"], "options": self.info["options"], "metrics": meta,
                "images": self.images, "summary": self.summary, "curves": self.curves, **self.sanity,
                "seconds_per_image": self.timing, "gates": [f.__dict__ | {"message": f.message()}
                                                             for f in self.failures],
                "warnings": self.warnings}


def _metadata(name: str, info: dict[str, Any]) -> dict[str, Any]:
    if name in REGISTRY:
        m = REGISTRY[name]
        opts = info["metric_options"].get(name, m.defaults)
        return {"higher_is_better": m.higher_is_better, "summary": m.summary, "paper": m.paper,
                "options": opts, "forward_passes_per_image": m.cost(opts)}
    s = SANITY[name]
    opts = info["sanity_options"].get(name, s.defaults)
    return {"higher_is_better": s.higher_is_better, "summary": s.summary, "paper": s.paper,
            "options": _jsonable(opts), "map_recomputations_per_image": s.cost(opts)}


def higher_is_better(metric: str) -> bool:
    return REGISTRY[metric].higher_is_better if metric in REGISTRY else SANITY[metric].higher_is_better


# -- options ----------------------------------------------------------------------------------------------
def _merge_options(name: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    unknown = set(given) - set(defaults)
    if unknown:
        raise UsageError(f"{name}: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(defaults) or 'none'})")
    return {**defaults, **given}


def resolve(opts: EvaluateOptions) -> tuple[list[str], list[str], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Check the options before anything is loaded: the metric list, the sanity list and their options."""
    if not opts.runs:
        raise UsageError("give at least one run folder")
    for run in opts.runs:
        if not (Path(run) / "manifest.jsonl").is_file() or not (Path(run) / "run.json").is_file():
            raise UsageError(f"{run} is not an explain run folder (no run.json and manifest.jsonl)")
    if opts.baseline not in BASELINES:
        raise UsageError(f"--baseline {opts.baseline!r}: expected one of {', '.join(BASELINES)}")
    regions = opts.boxes is not None or opts.masks is not None
    if opts.boxes is not None and opts.masks is not None:
        raise UsageError("give --boxes or --masks, not both")
    if opts.metrics is None:
        metrics = [m.name for m in REGISTRY.values() if m.default and (regions or not m.needs_regions)]
    else:
        metrics = list(dict.fromkeys(opts.metrics))
    sanity = list(dict.fromkeys(opts.sanity))
    for name in [*opts.fail_under, *opts.fail_over]:
        if name in SANITY and name not in sanity:
            sanity.append(name)
        elif name in REGISTRY and name not in metrics:
            metrics.append(name)
    for name in metrics:
        if name in SANITY:
            raise UsageError(f"--metrics {name}: {name} is a sanity check; use --sanity {name}")
        if name not in REGISTRY:
            raise UsageError(f"--metrics {name!r} is not a metric (known: {', '.join(REGISTRY)})")
        if REGISTRY[name].needs_regions and not regions:
            raise UsageError(f"{name} needs object regions: give --boxes FILE or --masks DIR")
    for name in sanity:
        if name not in SANITY:
            raise UsageError(f"--sanity {name!r}: expected one of {', '.join(SANITY)}")
    for name in [*opts.fail_under, *opts.fail_over]:
        if name not in REGISTRY and name not in SANITY:
            raise UsageError(f"gate on {name!r}: not a metric or sanity check")
    for name in opts.metric_options:
        if name not in REGISTRY:
            raise UsageError(f"options for {name!r}: not a metric")
    for name in opts.sanity_options:
        if name not in SANITY:
            raise UsageError(f"options for {name!r}: not a sanity check")
    metric_opts = {m: _merge_options(m, REGISTRY[m].defaults, opts.metric_options.get(m, {})) for m in metrics}
    sanity_opts = {s: _merge_options(s, SANITY[s].defaults, opts.sanity_options.get(s, {})) for s in sanity}
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError("--batch-size must be at least 1 (or auto)")
    if opts.group_size < 1:
        raise UsageError("group size must be at least 1")
    return metrics, sanity, metric_opts, sanity_opts


# -- runs -------------------------------------------------------------------------------------------------
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
    folder: Path
    name: str
    info: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return int((self.info.get("options") or {}).get("seed", 0) or 0)

    @property
    def score(self) -> str:
        return str((self.info.get("options") or {}).get("score") or "logit")


_PARAM_NOISE = {"seed", "sigma"}  # per-run or per-image values that do not tell methods apart


def read_run(folder: Path) -> RunData:
    """run.json and the usable manifest records (status ok or skipped, with a .npy; the last record of an
    (image, method, settings, target) wins, as a re-run appends)."""
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder}/run.json: cannot read it ({e})") from None
    if not isinstance(info, dict) or "model" not in info or "data_config" not in info:
        raise UsageError(f"{folder}/run.json: no model source or data config recorded")
    run = RunData(folder, folder.resolve().name or str(folder), info)
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in read_manifest(folder / "manifest.jsonl"):
        if rec.get("status") not in ("ok", "skipped") or not (rec.get("outputs") or {}).get("npy"):
            continue
        if rec.get("target") is None:
            continue
        params = {k: v for k, v in (rec.get("params") or {}).items() if k not in _PARAM_NOISE}
        ident = (rec.get("key"), rec.get("method"), json.dumps(params, sort_keys=True, default=str),
                 rec.get("target"))
        latest[ident] = rec
    run.rows = [Row(run, rec) for rec in latest.values()]
    return run


def assign_labels(runs: list[RunData]) -> None:
    """Method labels: the method name; `name[k=v,...]` when one run has several settings of a method (a
    noise sweep); prefixed with the run folder's name when several runs share a label."""
    for run in runs:
        settings: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for row in run.rows:
            params = {k: v for k, v in (row.record.get("params") or {}).items() if k not in _PARAM_NOISE}
            settings[row.record["method"]][json.dumps(params, sort_keys=True, default=str)] = params
        for row in run.rows:
            method = row.record["method"]
            variants = settings[method]
            if len(variants) == 1:
                row.label = method
                continue
            params = {k: v for k, v in (row.record.get("params") or {}).items() if k not in _PARAM_NOISE}
            differing = sorted(k for k in set().union(*(p.keys() for p in variants.values()))
                               if len({json.dumps(p.get(k), default=str) for p in variants.values()}) > 1)
            row.label = f"{method}[{','.join(f'{k}={params.get(k)}' for k in differing)}]"
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


def _model_for(run: RunData, device: torch.device, cache: dict[str, LoadedModel]) -> LoadedModel:
    source = run.info["model"]
    key = json.dumps(source, sort_keys=True, default=str)
    if key in cache:
        return cache[key]
    cfg = run.info["data_config"]
    overrides = {k: cfg.get(k) for k in ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")}
    kind = source.get("kind")
    if kind == "default":
        model = load_model("default", device=device, overrides=overrides)
    elif kind == "timm":
        weights = source.get("weights")
        model = load_model(str(source["name"]), checkpoint=None if weights in (None, "pretrained") else str(weights),
                           device=device, overrides=overrides)
    elif kind == "torchscript":
        model = load_model(str(source["weights"]), device=device, overrides=overrides)
    else:
        raise ModelError(f"{run.folder}/run.json: unknown model kind {kind!r}")
    cache[key] = model
    return model


@dataclass
class LoadedImage:
    x: torch.Tensor  # (C, H, W) on the device
    seed: int
    size: tuple[int, int]  # original (width, height)
    box: list[float]


def _load_image(row: Row, cfg: dict[str, Any], device: torch.device) -> LoadedImage:
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
    img = decode(data)
    x, box = preprocess(img, cfg)
    return LoadedImage(x.to(device), image_seed(row.run.seed, digest), img.size, box)


def _load_map(row: Row, shape: tuple[int, int]) -> np.ndarray:
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


# -- the evaluation ---------------------------------------------------------------------------------------
class _Collector:
    """Per-row metric values, curves and sanity curves, gathered group by group."""

    def __init__(self) -> None:
        self.values: dict[int, dict[str, float | None]] = defaultdict(dict)
        self.curves: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
        self.curve_axes: dict[str, tuple[list[float], str, str]] = {}
        self.sanity: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, rows: list[int], labels: list[str], scores: Scores) -> None:
        vals = scores.values.detach().float().cpu().tolist()
        for r, v in zip(rows, vals, strict=True):
            self.values[r][name] = v if math.isfinite(v) else None
        if scores.curves is not None and scores.curve_x is not None:
            curves = scores.curves.detach().float().cpu().tolist()
            for label, c in zip(labels, curves, strict=True):
                self.curves[name][label].append(c)
            self.curve_axes[name] = (scores.curve_x.detach().float().cpu().tolist(), scores.x_label, scores.y_label)


def _mean_curves(curves: list[list[float]]) -> dict[str, Any]:
    """Mean and 95 % CI half-width at each point of equally long curves (the most common length)."""
    length = Counter(len(c) for c in curves).most_common(1)[0][0]
    same = [c for c in curves if len(c) == length]
    stats = [mean_ci95([c[i] for c in same]) for i in range(length)]
    return {"mean": [s["mean"] for s in stats], "ci95": [s["ci95"] for s in stats], "n": len(same)}


def evaluate_runs(opts: EvaluateOptions, on_progress: Progress | None = None) -> Evaluation:
    """Score every map of the runs; write evaluation.json, evaluation.csv and plots unless `opts.write` is
    off. Raises UsageError for bad options; per-row problems (missing image, unreadable map) become warnings."""
    from saliency_cli.api import default_batch_size  # here: api may one day import this module

    metrics, sanity, metric_opts, sanity_opts = resolve(opts)
    boxes = read_boxes(opts.boxes) if opts.boxes is not None else None
    masks = index_masks(opts.masks) if opts.masks is not None else None
    runs = [read_run(Path(r)) for r in opts.runs]
    assign_labels(runs)
    if not any(run.rows for run in runs):
        raise UsageError("the runs hold no finished maps to evaluate")
    device = resolve_device(opts.device)
    warnings: list[str] = []
    models: dict[str, LoadedModel] = {}
    col = _Collector()
    all_rows = [row for run in runs for row in run.rows]
    row_id = {id(row): i for i, row in enumerate(all_rows)}
    failed: set[int] = set()
    regions_table: dict[str, Any] | None = boxes if boxes is not None else masks
    distinct = {r.image for r in all_rows}
    ambiguous = {n for n, c in Counter(Path(i).name for i in distinct).items() if c > 1}
    ambiguous |= {n for n, c in Counter(Path(i).stem for i in distinct).items() if c > 1}
    done = 0
    for run in runs:
        if not run.rows:
            warnings.append(f"{run.folder}: no finished maps")
            continue
        model = _model_for(run, device, models)
        batch_size = opts.batch_size or default_batch_size(device)
        oracle = GradientOracle(model.module, batch_size=batch_size, score=run.score,
                                auto_backoff=opts.batch_size is None)
        cfg = run.info["data_config"]
        lo, hi = input_bounds(cfg)
        ctx = Context(lo=lo, hi=hi, seed=run.seed).to(device)
        images = list(dict.fromkeys(row.image for row in run.rows))
        for start in range(0, len(images), opts.group_size):
            group = images[start:start + opts.group_size]
            members = set(group)
            rows = [row for row in run.rows if row.image in members]
            _evaluate_group(run, rows, oracle, ctx, cfg, device, metrics, metric_opts, sanity, sanity_opts,
                            opts.baseline, regions_table, ambiguous, col, row_id, failed, warnings)
            done += len(rows)
            if on_progress is not None:
                on_progress(done, len(all_rows))
    if regions_table is not None:
        used = sum(1 for i in range(len(all_rows)) if col.values[i].get("pointing") is not None
                   or col.values[i].get("energy") is not None)
        if used == 0:
            warnings.append("no image of the runs has an object region in the --boxes/--masks given")
    return _finish(opts, runs, all_rows, row_id, failed, metrics, metric_opts, sanity, sanity_opts, col, warnings)


def _evaluate_group(run: RunData, rows: list[Row], oracle: GradientOracle, ctx: Context, cfg: dict[str, Any],
                    device: torch.device, metrics: list[str], metric_opts: dict[str, dict[str, Any]],
                    sanity: list[str], sanity_opts: dict[str, dict[str, Any]], baseline: str,
                    regions_table: dict[str, Any] | None, ambiguous: set[str], col: _Collector,
                    row_id: dict[int, int], failed: set[int], warnings: list[str]) -> None:
    loaded: dict[str, LoadedImage] = {}
    for row in rows:
        if row.image in loaded:
            continue
        try:
            loaded[row.image] = _load_image(row, cfg, device)
        except SaliencyError as e:
            warnings.append(f"{row.image}: {e}")
    good: list[Row] = []
    maps: list[np.ndarray] = []
    for row in rows:
        if row.image not in loaded:
            failed.add(row_id[id(row)])
            continue
        x = loaded[row.image].x
        try:
            maps.append(_load_map(row, (x.shape[-2], x.shape[-1])))
        except SaliencyError as e:
            warnings.append(f"{row.image} ({row.label}): {e}")
            failed.add(row_id[id(row)])
            continue
        good.append(row)
    if not good:
        return
    order = list(loaded)
    img_index = torch.tensor([order.index(r.image) for r in good], device=device)
    x_img = torch.stack([loaded[i].x for i in order])  # (G, C, H, W)
    from saliency_cli.methods.base import baseline as method_baseline

    ref_img = method_baseline(x_img, baseline, ctx, [])  # (G, C, H, W), once per image, not per method
    batch = Batch(oracle=oracle, x=x_img[img_index], target=torch.tensor([r.target for r in good], device=device),
                  maps=torch.from_numpy(np.stack(maps)).to(device), ctx=ctx, baseline=baseline,
                  seeds=[loaded[r.image].seed for r in good], ref=ref_img[img_index])
    if regions_table is not None:
        regs, has = [], []
        for row, m in zip(good, maps, strict=True):
            entry = lookup(regions_table, row.image, str(row.record.get("key", "")), ambiguous)
            li = loaded[row.image]
            if entry is None:
                regs.append(np.zeros(m.shape, dtype=bool))
                has.append(False)
            elif isinstance(entry, Path):
                regs.append(mask_region(entry, li.size, li.box, m.shape))
                has.append(True)
            else:
                regs.append(box_region(entry, li.box, m.shape))
                has.append(True)
        batch.regions = torch.from_numpy(np.stack(regs)).to(device)
        batch.has_region = torch.tensor(has, device=device)
    ids = [row_id[id(r)] for r in good]
    labels = [r.label for r in good]
    for name in metrics:
        t0 = time.perf_counter()
        scores = REGISTRY[name].fn(batch, **metric_opts[name])
        col.seconds[name] += time.perf_counter() - t0
        col.counts[name] += len(good)
        col.add(name, ids, labels, scores)
    for check in sanity:
        by_label: dict[str, list[int]] = defaultdict(list)
        for j, row in enumerate(good):
            by_label[row.label].append(j)
        for label, js in by_label.items():
            method = METHODS.get(good[js[0]].record["method"])
            if method is None:
                warnings.append(f"{check}: method {good[js[0]].record['method']!r} is not available here; "
                                f"skipped {label}")
                continue
            t0 = time.perf_counter()
            values = _sanity(check, sanity_opts[check], method, [good[j] for j in js], batch,
                             torch.tensor(js, device=device), oracle, ctx, run.seed, col.sanity[check])
            col.seconds[check] += time.perf_counter() - t0
            col.counts[check] += len(js)
            col.add(check, [ids[j] for j in js], [labels[j] for j in js], Scores(values))


def _sanity(check: str, options: dict[str, Any], method: Method, rows: list[Row], batch: Batch, sel: torch.Tensor,
            oracle: GradientOracle, ctx: Context, seed: int, store: dict[str, dict[str, Any]]) -> torch.Tensor:
    """Run one sanity check on the rows of one method label; appends per-image curves to `store[label]` and
    returns the per-row values (R,)."""
    x, target = batch.x[sel], batch.target[sel]
    recompute = _recomputer(method, rows[0].record.get("params") or {}, oracle, x, target,
                            [batch.seeds[j] for j in sel.tolist()], ctx)
    entry = store.setdefault(rows[0].label, {"images": []})
    if check == "randomization":
        res = randomization(oracle.model, recompute, seed=seed, **options)
        entry["stages"] = res.stages
        for row, corr in zip(rows, res.correlations.T.cpu().tolist(), strict=True):
            entry["images"].append({"image": row.image, "target": row.target, "correlations": corr})
        return res.value
    res_p = perturbation(oracle.model, recompute, lambda: oracle.probabilities(x, target), seed=seed, **options)
    entry["t"] = res_p.t
    for row, sim, prob in zip(rows, res_p.similarity.T.cpu().tolist(), res_p.probability.T.cpu().tolist(),
                              strict=True):
        entry["images"].append({"image": row.image, "target": row.target, "similarity": sim, "probability": prob})
    return res_p.value


def _recomputer(method: Method, params: dict[str, Any], oracle: GradientOracle, x: torch.Tensor,
                target: torch.Tensor, seeds: list[int], ctx: Context) -> Callable[[], torch.Tensor]:
    """A closure recomputing the rows' maps under the model as it is when called, exactly as explain did:
    the recorded hyper-parameters, each image's generator from (run seed, image bytes), the recorded channel
    reduction ('none' -> sum of |.|). Rows go in groups sized like explain's (batch size / method cost)."""
    hyper = {k: params[k] for k in method.defaults if k in params}
    hyper = {**method.defaults, **hyper}
    how = str(params.get("reduce") or method.reduce)
    cost = max(1, int(method.cost(hyper)))

    def recompute() -> torch.Tensor:
        out = []
        step = max(1, oracle.batch_size // cost)
        for a in range(0, x.shape[0], step):
            gens = [torch.Generator(device=x.device).manual_seed(s) for s in seeds[a:a + step]]
            result = method.fn(oracle, x[a:a + step], target[a:a + step], generators=gens, ctx=ctx, **hyper)
            m = reduce_channels(result.maps.float(), how)
            out.append(m.abs().sum(1) if m.dim() == 4 else m)
        return torch.cat(out)

    return recompute


def _finish(opts: EvaluateOptions, runs: list[RunData], all_rows: list[Row], row_id: dict[int, int],
            failed: set[int], metrics: list[str], metric_opts: dict[str, dict[str, Any]], sanity: list[str],
            sanity_opts: dict[str, dict[str, Any]], col: _Collector, warnings: list[str]) -> Evaluation:
    names = metrics + sanity
    images = []
    by_label: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for row in all_rows:
        i = row_id[id(row)]
        if i in failed:
            continue
        vals = {n: col.values[i].get(n) for n in names}
        images.append({"run": str(row.run.folder), "image": row.image, "key": row.record.get("key"),
                       "method": row.label, "target": row.target, "label": row.record.get("label"),
                       "metrics": vals})
        for n in names:
            by_label[row.label][n].append(vals[n])
    summary = {label: {n: mean_ci95([v for v in vals if v is not None]) for n, vals in per.items()}
               for label, per in by_label.items()}
    curves: dict[str, dict[str, Any]] = {}
    for name, per_label in col.curves.items():
        x, x_label, y_label = col.curve_axes[name]
        curves[name] = {"x": x, "x_label": x_label, "y_label": y_label,
                        "methods": {label: _mean_curves(c) for label, c in per_label.items()}}
    sanity_out: dict[str, dict[str, Any]] = {}
    for check in sanity:
        per = {}
        for label, entry in col.sanity.get(check, {}).items():
            if check == "randomization":
                per[label] = {"stages": entry["stages"],
                              **_mean_curves([it["correlations"] for it in entry["images"]]),
                              "images": entry["images"]}
            else:
                per[label] = {"t": entry["t"],
                              "similarity": _mean_curves([it["similarity"] for it in entry["images"]]),
                              "probability": _mean_curves([it["probability"] for it in entry["images"]]),
                              "images": entry["images"]}
        sanity_out[check] = per
    timing = {n: col.seconds[n] / col.counts[n] for n in names if col.counts.get(n)}
    failures = gates(summary, opts.fail_under, opts.fail_over)
    out = Path(opts.out) if opts.out is not None else Path(opts.runs[0])
    info = {"runs": [str(r.folder) for r in runs], "metric_options": metric_opts, "sanity_options": sanity_opts,
            "options": _jsonable({"baseline": opts.baseline, "metrics": metrics, "sanity": sanity,
                                  "metric_options": metric_opts, "sanity_options": sanity_opts,
                                  "boxes": opts.boxes, "masks": opts.masks, "device": opts.device,
                                  "fail_under": opts.fail_under, "fail_over": opts.fail_over})}
    ev = Evaluation(images, summary, curves, sanity_out, metrics, timing, failures, warnings, info, out)
    if opts.write:
        from saliency_cli.evaluate.report import write_reports

        ev.files = write_reports(ev, out, plots=opts.plots)
    return ev


def score_maps(metric: str, oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor,
               ctx: Context, *, seeds: list[int] | None = None, baseline: str = "blur", **options: Any) -> torch.Tensor:
    """One registered metric on in-memory maps, without a run folder: x (B, C, H, W), target (B,), maps
    (B, H, W) or (B, C, H, W) (then sum_c |m_c|), all on the model's device -> (B,) values. For methods that
    tune themselves against a metric (SmoothTaylor's adaptive noising uses `aupc` or `noise`)."""
    if metric not in REGISTRY:
        raise ValueError(f"unknown metric {metric!r}")
    m = REGISTRY[metric]
    if maps.dim() == 4:
        maps = maps.abs().sum(1)
    batch = Batch(oracle=oracle, x=x, target=target, maps=maps.float(), ctx=ctx, baseline=baseline,
                  seeds=list(seeds) if seeds is not None else [0] * x.shape[0])
    return m.fn(batch, **_merge_options(metric, m.defaults, options)).values


def gates(summary: dict[str, dict[str, dict[str, Any]]], fail_under: dict[str, float],
          fail_over: dict[str, float]) -> list[Failure]:
    """Every (metric, method) whose mean crosses its bound; a gated metric without any value fails too (a CI
    gate must not pass because nothing was measured)."""
    failures = []
    for kind, bounds in (("under", fail_under), ("over", fail_over)):
        for metric, bound in bounds.items():
            seen = False
            for label, per in summary.items():
                mean = (per.get(metric) or {}).get("mean")
                if mean is None:
                    continue
                seen = True
                if (kind == "under" and mean < bound) or (kind == "over" and mean > bound):
                    failures.append(Failure(metric, label, mean, bound, kind))
            if not seen:
                failures.append(Failure(metric, "any method", None, bound, kind))
    return failures


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
