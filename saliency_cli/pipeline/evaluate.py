"""`evaluate_runs(...)`: score the maps of one or more `explain` runs, usable from Python without the CLI.

run folders -> run.json (model source, data config, seed) + manifest.jsonl (image, target, .npy per method)
            -> reload the model and the images -> groups of images: every map metric batched over all rows
               (image x method) of the group; sanity checks recompute the maps with the run's method
            -> per-image values, per-method means with 95 % confidence intervals, mean curves, gates
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_cli.data import baseline, input_bounds
from saliency_cli.errors import SaliencyError, UsageError, first_line, unknown
from saliency_cli.methods import METHODS
from saliency_cli.methods.base import Method, MethodContext
from saliency_cli.metrics import BASELINES, METRICS, SANITY_CHECKS, Batch, Scores, merge_options, scorer_for
from saliency_cli.metrics.base import mean_curves
from saliency_cli.metrics.localisation import box_region, index_masks, lookup, mask_region, read_boxes
from saliency_cli.models import LoadedModel, num_classes, resolve_device
from saliency_cli.numerics import mean_ci95, seeded_generator
from saliency_cli.oracle import GradientOracle, checked_fast_copy, default_batch_size
from saliency_cli.pipeline.shards import resolve_shard
from saliency_cli.reduce import reduce_channels
from saliency_cli.runfolder.evaluation import Evaluation, Failure, write_reports
from saliency_cli.runfolder.folder import (
    LoadedImage,
    Row,
    RunData,
    assign_labels,
    load_image,
    load_map,
    read_run,
    reload_model,
)
from saliency_cli.runfolder.records import manifest_parts
from saliency_cli.runfolder.runinfo import has_run_record
from saliency_cli.writers import jsonable

__all__ = ["EvaluateOptions", "Evaluation", "Failure", "Selection", "evaluate_runs", "gates", "recomputer", "select",
           "resolve"]

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
    shard: str | None = None  # `I/N`: score only the images of that shard (None: from the launcher, else all)
    images: Path | None = None  # `--images DIR`: where the runs' images are now (DIR/KEY), when they moved


# -- options ----------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """The checked choice: the metrics and sanity checks to run (gated ones included) and their full options."""

    metrics: list[str]
    sanity: list[str]
    metric_options: dict[str, dict[str, Any]]
    sanity_options: dict[str, dict[str, Any]]


def _check_inputs(opts: EvaluateOptions) -> None:
    if not opts.runs:
        raise UsageError("give at least one run folder")
    for run in opts.runs:
        if not manifest_parts(Path(run)) or not has_run_record(Path(run)):
            raise UsageError(f"{run} is not an explain run folder (no run.json and manifest.jsonl)")
    if opts.baseline not in BASELINES:
        raise unknown("--baseline", "value", opts.baseline, BASELINES)
    if opts.boxes is not None and opts.masks is not None:
        raise UsageError("give --boxes or --masks, not both")


def _chosen(opts: EvaluateOptions, regions: bool) -> tuple[list[str], list[str]]:
    """The metric and sanity names asked for, in order, plus every gated one."""
    if opts.metrics is None:
        metrics = [m.name for m in METRICS.values() if m.default and (regions or not m.needs_regions)]
    else:
        metrics = list(dict.fromkeys(opts.metrics))
    sanity = list(dict.fromkeys(opts.sanity))
    for name in [*opts.fail_under, *opts.fail_over]:
        if name in SANITY_CHECKS and name not in sanity:
            sanity.append(name)
        elif name in METRICS and name not in metrics:
            metrics.append(name)
    return metrics, sanity


def _check_names(opts: EvaluateOptions, metrics: list[str], sanity: list[str], regions: bool) -> None:
    for name in metrics:
        if name in SANITY_CHECKS:
            raise UsageError(f"--metrics {name}: {name} is a sanity check; use --sanity {name}")
        if name not in METRICS:
            raise unknown("--metrics", "metric", name, METRICS,
                          see="not a metric of saliency evaluate --list-metrics")
        if METRICS[name].needs_regions and not regions:
            raise UsageError(f"{name} needs object regions: give --boxes FILE or --masks DIR")
    for name in sanity:
        if name not in SANITY_CHECKS:
            raise unknown("--sanity", "sanity check", name, SANITY_CHECKS)
    for name in [*opts.fail_under, *opts.fail_over]:
        if name not in METRICS and name not in SANITY_CHECKS:
            raise unknown("--fail-under/--fail-over", "metric or sanity check to gate on", name,
                          [*METRICS, *SANITY_CHECKS], see="see saliency evaluate --list-metrics")
    for name in opts.metric_options:
        if name not in METRICS:
            raise UsageError(f"options for {name!r}: not a metric")
    for name in opts.sanity_options:
        if name not in SANITY_CHECKS:
            raise UsageError(f"options for {name!r}: not a sanity check")


def resolve(opts: EvaluateOptions) -> Selection:
    """Check the options before anything is loaded: the run folders, the metric list, the sanity list and their
    options."""
    _check_inputs(opts)
    return select(opts)


def select(opts: EvaluateOptions) -> Selection:
    """The metric and sanity choice checked, without the run folders (`saliency check` asks before its run
    exists)."""
    regions = opts.boxes is not None or opts.masks is not None
    metrics, sanity = _chosen(opts, regions)
    _check_names(opts, metrics, sanity, regions)
    metric_opts = {m: merge_options(m, METRICS[m].defaults, opts.metric_options.get(m, {})) for m in metrics}
    sanity_opts = {s: merge_options(s, SANITY_CHECKS[s].defaults, opts.sanity_options.get(s, {})) for s in sanity}
    if opts.batch_size is not None and opts.batch_size < 1:
        raise UsageError("--batch-size must be at least 1 (or auto)")
    if opts.group_size < 1:
        raise UsageError("group size must be at least 1")
    return Selection(metrics, sanity, metric_opts, sanity_opts)


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


# -- the state of one evaluation --------------------------------------------------------------------------
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

    def timed(self, name: str, rows: int, started: float) -> None:
        self.seconds[name] += time.perf_counter() - started
        self.counts[name] += rows


@dataclass
class _Session:
    """What every group of every run shares: the options, the object regions, the results so far."""

    opts: EvaluateOptions
    selection: Selection
    regions: dict[str, Any] | None  # image name -> boxes, or -> mask file; None: no localisation
    ambiguous: set[str]  # file names (and stems) shared by several images of the evaluation
    all_rows: list[Row]
    row_id: dict[int, int] = field(default_factory=dict)  # id(row) -> its index in all_rows
    failed: set[int] = field(default_factory=set)  # indices of rows whose image or map could not be read
    collector: _Collector = field(default_factory=_Collector)
    warnings: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # one per row that could not be scored

    def fail(self, row: Row, reason: str) -> None:
        """Record that a row could not be scored; the others go on."""
        i = self.row_id[id(row)]
        if i in self.failed:
            return
        self.failed.add(i)
        self.errors.append({"run": str(row.run.folder), "image": row.image, "method": row.label,
                            "target": row.record.target, "error": reason})

    def __post_init__(self) -> None:
        self.row_id = {id(row): i for i, row in enumerate(self.all_rows)}

    def ids(self, rows: list[Row]) -> list[int]:
        return [self.row_id[id(r)] for r in rows]


@dataclass
class _RunScope:
    """One run being scored: its model behind an oracle, its data config and the methods' context."""

    run: RunData
    oracle: GradientOracle
    cfg: dict[str, Any]
    ctx: MethodContext  # the input range on the device, the run seed, the metric scorer
    device: torch.device
    classes: int  # the model's class count: a row whose target is not below it cannot be scored


@dataclass
class _Group:
    """The rows of a group of images whose image and map could be read, with their images and maps."""

    rows: list[Row]
    loaded: dict[str, LoadedImage]
    maps: list[np.ndarray]


MISSING_SHOWN = 5  # images named in the warning about images without an object region


def _ambiguous_names(rows: list[Row]) -> set[str]:
    distinct = {r.image for r in rows}
    ambiguous = {n for n, c in Counter(Path(i).name for i in distinct).items() if c > 1}
    return ambiguous | {n for n, c in Counter(Path(i).stem for i in distinct).items() if c > 1}


def run_oracle(run: RunData, model: LoadedModel, device: torch.device, batch_size: int, *,
               auto_backoff: bool = False) -> GradientOracle:
    """The oracle the maps of a run are recomputed with (sanity checks): over the model explain used, its
    `--fast` copy when the run made one (run.json's `fast`), with the run's score."""
    fast = None
    if (run.info.get("fast") or {}).get("folded"):
        fast, _ = checked_fast_copy(model.module, device, run.info["data_config"].get("input_size"))
    return GradientOracle(model.module, batch_size=batch_size, score=run.score, auto_backoff=auto_backoff, fast=fast,
                          probability=model.probability)


def _open_run(run: RunData, opts: EvaluateOptions, device: torch.device, models: dict[str, LoadedModel]
              ) -> _RunScope:
    model = reload_model(run, device, models)
    batch_size = opts.batch_size or default_batch_size(device)
    cfg = run.info["data_config"]
    oracle = run_oracle(run, model, device, batch_size, auto_backoff=opts.batch_size is None)
    bounds = input_bounds(cfg).to(device)
    return _RunScope(run, oracle, cfg, MethodContext(bounds, seed=run.seed, scorer=scorer_for(bounds)), device,
                     num_classes(model))


# -- the evaluation ---------------------------------------------------------------------------------------
def evaluate_runs(opts: EvaluateOptions, on_progress: Progress | None = None) -> Evaluation:
    """Score every map of the runs; write evaluation.json, evaluation.csv and plots unless `opts.write` is
    off. Raises UsageError for bad options; per-row problems (missing image, unreadable map) become warnings."""
    selection = resolve(opts)
    boxes = read_boxes(opts.boxes) if opts.boxes is not None else None
    masks = index_masks(opts.masks) if opts.masks is not None else None
    shard = resolve_shard(opts.shard)
    runs = [read_run(Path(r), images=opts.images) for r in opts.runs]
    for run in runs:
        run.rows = [row for row in run.rows if shard.owns(row.record.key)]
    assign_labels(runs)
    if not any(run.rows for run in runs):
        raise UsageError("the runs hold no finished maps to evaluate")
    device = resolve_device(opts.device)
    all_rows = [row for run in runs for row in run.rows]
    session = _Session(opts, selection, boxes if boxes is not None else masks, _ambiguous_names(all_rows), all_rows)
    coverage = region_coverage(session)  # before any work: an ambiguous name in the file stops here
    if coverage is not None:
        session.warnings.append(coverage)
    models: dict[str, LoadedModel] = {}
    done = 0
    for run in runs:
        if run.bad_lines:
            session.warnings.append(f"{run.folder}: {run.bad_lines} unreadable manifest line(s) skipped")
        if not run.rows:
            session.warnings.append(f"{run.folder}: no finished maps")
            continue
        scope = _open_run(run, opts, device, models)
        images = list(dict.fromkeys(row.image for row in run.rows))
        for start in range(0, len(images), opts.group_size):
            members = set(images[start:start + opts.group_size])
            rows = [row for row in run.rows if row.image in members]
            _evaluate_group(session, scope, rows)
            done += len(rows)
            if on_progress is not None:
                on_progress(done, len(all_rows))
    return _finish(session, runs)


def _evaluate_group(s: _Session, scope: _RunScope, rows: list[Row]) -> None:
    group = _load_group(s, scope, rows)
    if not group.rows:
        return
    try:
        batch = _group_batch(s, scope, group)
        ids, labels = s.ids(group.rows), [r.label for r in group.rows]
        for name in s.selection.metrics:
            t0 = time.perf_counter()
            scores = METRICS[name].fn(batch, **s.selection.metric_options[name])
            s.collector.timed(name, len(group.rows), t0)
            s.collector.add(name, ids, labels, scores)
        for name in s.selection.sanity:
            _sanity_check(s, scope, name, group.rows, batch)
    except (KeyboardInterrupt, UsageError):
        raise
    except Exception as e:  # noqa: BLE001 - one group's failure is recorded per row; the other groups go on
        if os.environ.get("SALIENCY_DEBUG") == "1":
            raise
        for row in group.rows:
            s.fail(row, first_line(e))


def _load_group(s: _Session, scope: _RunScope, rows: list[Row]) -> _Group:
    """The images and maps of the rows; a row whose image or map cannot be read is a warning and is left out."""
    loaded: dict[str, LoadedImage] = {}
    failures: dict[str, str] = {}
    for row in rows:
        if row.image in loaded or row.image in failures:
            continue
        try:
            loaded[row.image] = load_image(row, scope.cfg, scope.device)
        except SaliencyError as e:
            failures[row.image] = str(e)
        except Exception as e:  # noqa: BLE001 - a bad image is this row's error, not the evaluation's
            failures[row.image] = first_line(e)
    group = _Group([], loaded, [])
    for row in rows:
        if row.image not in loaded:
            s.fail(row, failures.get(row.image, "the image could not be read"))
            continue
        if not 0 <= row.target < scope.classes:
            s.fail(row, f"target {row.target} is not a class of the model ({scope.classes} classes)")
            continue
        x = loaded[row.image].x
        try:
            group.maps.append(load_map(row, (x.shape[-2], x.shape[-1])))
        except SaliencyError as e:
            s.fail(row, str(e))
            continue
        except Exception as e:  # noqa: BLE001 - e.g. a map of shape (0, 0)
            s.fail(row, f"cannot use the map: {first_line(e)}")
            continue
        group.rows.append(row)
    return group


def _group_batch(s: _Session, scope: _RunScope, group: _Group) -> Batch:
    """The batch of the group's rows; the reference infill is computed once per image, not per method."""
    device, loaded = scope.device, group.loaded
    order = list(loaded)
    img_index = torch.tensor([order.index(r.image) for r in group.rows], device=device)
    x_img = torch.stack([loaded[i].x for i in order])  # (G, C, H, W)
    ref_img = baseline(x_img, s.opts.baseline, scope.ctx.bounds, [])  # (G, C, H, W)
    batch = Batch(oracle=scope.oracle, x=x_img[img_index],
                  target=torch.tensor([r.target for r in group.rows], device=device),
                  maps=torch.from_numpy(np.stack(group.maps)).to(device), bounds=scope.ctx.bounds,
                  baseline=s.opts.baseline, seeds=[loaded[r.image].seed for r in group.rows], ref=ref_img[img_index])
    if s.regions is not None:
        batch.regions, batch.has_region = _group_regions(s, group, device)
    return batch


def _group_regions(s: _Session, group: _Group, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's object region in its map's frame (R, H, W) and whether it has one (R,)."""
    assert s.regions is not None
    regs, has = [], []
    for row, m in zip(group.rows, group.maps, strict=True):
        entry = _region_of(s, row)
        li = group.loaded[row.image]
        if entry is None:
            regs.append(np.zeros(m.shape, dtype=bool))
            has.append(False)
        elif isinstance(entry, Path):
            regs.append(mask_region(entry, li.size, li.box, m.shape))
            has.append(True)
        else:
            regs.append(box_region(entry, li.box, m.shape))
            has.append(True)
    return torch.from_numpy(np.stack(regs)).to(device), torch.tensor(has, device=device)


def _region_of(s: _Session, row: Row) -> Any:
    """The row's boxes or mask file, by its path as given to explain, absolute path, key or file name."""
    assert s.regions is not None
    return lookup(s.regions, row.image, row.record.key, s.ambiguous, row.record.image)


def region_coverage(s: _Session) -> str | None:
    """One warning naming the images without an object region: `boxes for 2 of 6 images; no box for: a.png,
    b.png, ... (+N more)`, or None when every image has one."""
    if s.regions is None:
        return None
    images: dict[str, Row] = {}
    for row in s.all_rows:
        images.setdefault(row.image, row)
    missing = sorted(row.record.key or row.image for row in images.values()
                     if _region_of(s, row) is None)
    if not missing:
        return None
    what, one = ("boxes", "box") if s.opts.boxes is not None else ("masks", "mask")
    if len(missing) == len(images):
        return f"no image of the runs has an object region in the --{what} given ({len(images)} images)"
    shown = ", ".join(missing[:MISSING_SHOWN]) + (f", ... (+{len(missing) - MISSING_SHOWN} more)"
                                                   if len(missing) > MISSING_SHOWN else "")
    return f"{what} for {len(images) - len(missing)} of {len(images)} images; no {one} for: {shown}"


def _sanity_check(s: _Session, scope: _RunScope, name: str, rows: list[Row], batch: Batch) -> None:
    """One sanity check on the group, method label by method label (each label's maps are recomputed)."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for j, row in enumerate(rows):
        by_label[row.label].append(j)
    ids, labels = s.ids(rows), [r.label for r in rows]
    for label, js in by_label.items():
        method = METHODS.get(rows[js[0]].record.method)
        if method is None:
            s.warnings.append(f"{name}: method {rows[js[0]].record.method!r} is not available here; "
                              f"skipped {label}")
            continue
        t0 = time.perf_counter()
        values = _sanity_rows(s, scope, name, method, [rows[j] for j in js], batch,
                              torch.tensor(js, device=scope.device))
        s.collector.timed(name, len(js), t0)
        s.collector.add(name, [ids[j] for j in js], [labels[j] for j in js], Scores(values))


def _sanity_rows(s: _Session, scope: _RunScope, name: str, method: Method, rows: list[Row], batch: Batch,
                 sel: torch.Tensor) -> torch.Tensor:
    """Run check `name` on the rows of one method label (`sel`: their positions in the batch); appends the
    per-image curves to the collector and returns the per-row values (R,)."""
    check = SANITY_CHECKS[name]
    oracle = scope.oracle
    x, target = batch.x[sel], batch.target[sel]
    recompute = recomputer(method, rows[0].record.asked, oracle, x, target,
                           [batch.seeds[j] for j in sel.tolist()], scope.ctx)
    result = check.fn(oracle, recompute, lambda: oracle.probabilities(x, target), seed=scope.run.seed,
                      **s.selection.sanity_options[name])
    entry = s.collector.sanity[name].setdefault(rows[0].label, {"images": []})
    entry["shared"], entry["curves"] = result.shared, list(result.curves)
    per_row = {curve: values.T.cpu().tolist() for curve, values in result.curves.items()}
    for j, row in enumerate(rows):
        entry["images"].append({"image": row.image, "target": row.target,
                                **{curve: values[j] for curve, values in per_row.items()}})
    return result.value


def recomputer(method: Method, params: dict[str, Any], oracle: GradientOracle, x: torch.Tensor,
               target: torch.Tensor, seeds: list[int], ctx: MethodContext) -> Callable[[], torch.Tensor]:
    """A closure recomputing the rows' maps under the model as it is when called, exactly as explain did:
    the recorded hyper-parameters, each image's generator from (run seed, image bytes), the recorded channel
    reduction ('none' -> sum of |.|). Rows go in groups sized like explain's (batch size / method cost)."""
    hyper = method.hyper_for(params)  # the recorded settings (as asked), with a smoother's --base settings
    how = str(params.get("reduce") or method.reduce)
    cost = max(1, int(method.cost(hyper)))

    def recompute() -> torch.Tensor:
        out = []
        step = max(1, oracle.batch_size // cost)
        for a in range(0, x.shape[0], step):
            gens = [seeded_generator(s, x.device) for s in seeds[a:a + step]]
            result = method.fn(oracle, x[a:a + step], target[a:a + step], generators=gens, ctx=ctx, **hyper)
            m = reduce_channels(result.maps.float(), how, result.display)
            out.append(m.abs().sum(1) if m.dim() == 4 else m)
        return torch.cat(out)

    return recompute


# -- the result -------------------------------------------------------------------------------------------
def _image_rows(s: _Session, names: list[str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[Any]]]]:
    """evaluation.json's per-image rows, and every method label's values of each metric."""
    images = []
    by_label: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for row in s.all_rows:
        i = s.row_id[id(row)]
        if i in s.failed:
            continue
        vals = {n: s.collector.values[i].get(n) for n in names}
        images.append({"run": str(row.run.folder), "image": row.image, "key": row.record.key,
                       "method": row.label, "target": row.target, "label": row.record.label,
                       "npy_sha256": row.npy_sha256, "metrics": vals})
        for n in names:
            by_label[row.label][n].append(vals[n])
    return images, by_label


def _sanity_summaries(s: _Session) -> dict[str, dict[str, Any]]:
    """Per check and method label: what is shared, the mean curves (laid out as the check says), the images."""
    out: dict[str, dict[str, Any]] = {}
    for name in s.selection.sanity:
        layout = SANITY_CHECKS[name].layout
        per = {}
        for label, entry in s.collector.sanity.get(name, {}).items():
            means = {curve: mean_curves([it[curve] for it in entry["images"]]) for curve in entry["curves"]}
            per[label] = {**entry["shared"], **layout(means), "images": entry["images"]}
        out[name] = per
    return out


def _finish(s: _Session, runs: list[RunData]) -> Evaluation:
    opts, sel, col = s.opts, s.selection, s.collector
    names = sel.metrics + sel.sanity
    images, by_label = _image_rows(s, names)
    summary = {label: {n: mean_ci95([v for v in vals if v is not None]) for n, vals in per.items()}
               for label, per in by_label.items()}
    curves: dict[str, dict[str, Any]] = {}
    for name, per_label in col.curves.items():
        x, x_label, y_label = col.curve_axes[name]
        curves[name] = {"x": x, "x_label": x_label, "y_label": y_label,
                        "methods": {label: mean_curves(c) for label, c in per_label.items()}}
    timing = {n: col.seconds[n] / col.counts[n] for n in names if col.counts.get(n)}
    failures = gates(summary, opts.fail_under, opts.fail_over)
    out = Path(opts.out) if opts.out is not None else Path(opts.runs[0])
    info = {"runs": [str(r.folder) for r in runs], "metric_options": sel.metric_options,
            "sanity_options": sel.sanity_options,
            "options": jsonable({"baseline": opts.baseline, "metrics": sel.metrics, "sanity": sel.sanity,
                                 "metric_options": sel.metric_options, "sanity_options": sel.sanity_options,
                                 "boxes": opts.boxes, "masks": opts.masks, "device": opts.device,
                                 "fail_under": opts.fail_under, "fail_over": opts.fail_over})}
    ev = Evaluation(images, summary, curves, _sanity_summaries(s), sel.metrics, timing, failures, s.warnings,
                    info, out, errors=s.errors, scored=len(images))
    if opts.write:
        ev.files = write_reports(ev, out, plots=opts.plots, suffix=resolve_shard(opts.shard).suffix)
    return ev
