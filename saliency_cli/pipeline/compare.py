"""`saliency compare RUN_A RUN_B`: how much the maps changed between two explain runs, per image and method.

    two run folders -> pairs of maps (same image: sha256 of the file, else the same key; same method label, or
    the only method of each run) -> magnitudes |m|, average-pooled to pool x pool -> Spearman rank correlation
    and IoU of the top `top` fraction of pixels -> comparison.json, comparison.csv, side-by-side strips

Typical use: the same images explained with a model before (A) and after (B) a retrain, or two methods on one
model. Maps are compared by magnitude (where the model looks, whatever the sign), and pooled (56 x 56 by default:
4 x 4 blocks of a 224 px map) so that pixel-scale noise, which differs between any two stochastic runs, does not
dominate the ranking. Similarity 1 means the same ranking; around 0, unrelated maps. Two identical pooled maps
have similarity 1 even when they are constant (where the correlation itself is undefined).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saliency_cli.errors import SaliencyError, UsageError, unknown
from saliency_cli.numerics import mean_ci95, spearman
from saliency_cli.render import montage, regions
from saliency_cli.runfolder.comparison import write_comparison
from saliency_cli.runfolder.folder import Row, RunData, assign_labels, load_map, read_run
from saliency_cli.runfolder.records import manifest_parts
from saliency_cli.writers import finite, write_png

GATE_METRICS = ("spearman", "iou")
STRIP_DIR = "comparison"
CHUNK = 64  # map pairs scored at once
Progress = Callable[[int, int], None]


@dataclass
class CompareOptions:
    """run_a, run_b: explain run folders; out: where the files go (default: run_b, the run under review);
    fail_under: {"spearman" | "iou": bound}, failing when any image's value is below; strips: how many of the
    most changed pairs get a side-by-side PNG; pool: side of the pooled maps; top: fraction of the top region."""

    run_a: Path
    run_b: Path
    out: Path | None = None
    fail_under: dict[str, float] = field(default_factory=dict)
    strips: int = 5
    pool: int = 56
    top: float = 0.1


@dataclass
class Pair:
    """Two maps of the same image and method, and their similarity (None: undefined)."""

    a: Row
    b: Row
    method: str
    spearman: float | None = None
    iou: float | None = None
    strip: str | None = None  # the side-by-side PNG, relative to the output folder

    @property
    def key(self) -> str:
        return self.b.record.key

    def changed(self) -> tuple[float, float, str, str]:
        """Sort key, most changed first: undefined values first, then by Spearman, then IoU."""
        s = -math.inf if self.spearman is None else self.spearman
        i = -math.inf if self.iou is None else self.iou
        return s, i, self.key, self.method

    def to_json(self) -> dict[str, Any]:
        def side(row: Row) -> dict[str, Any]:
            rec = row.record
            return {"key": rec.key, "image": rec.image, "method": row.label, "target": rec.target,
                    "label": rec.label, "score": rec.score, "npy": rec.npy, "npy_sha256": row.npy_sha256,
                    "overlay": rec.overlay}

        return {"key": self.key, "image": self.b.record.image, "sha256": self.b.record.sha256,
                "method": self.method, "spearman": self.spearman, "iou": self.iou, "strip": self.strip,
                "a": side(self.a), "b": side(self.b)}


@dataclass
class GateFailure:
    """A `--fail-under` gate: `count` of `total` pairs of `method` are below `bound`; the worst is `image`."""

    metric: str
    method: str
    image: str
    value: float | None
    bound: float
    count: int
    total: int
    differences: str = ""  # what else differs between the runs (models, preprocessing, this method's settings)

    def message(self) -> str:
        value = "undefined (one map is constant)" if self.value is None else f"{self.value:.3g} < {self.bound:g}"
        more = f" ({self.count} of {self.total} images below {self.bound:g})" if self.count > 1 else ""
        why = f" ({self.differences})" if self.differences else ""
        return f"{self.metric} of {self.method} on {self.image} is {value}{more}{why}"


@dataclass
class Comparison:
    """The result: pairs (most changed first), per-method summaries, unmatched maps, gate failures, files."""

    run_a: RunData
    run_b: RunData
    pairs: list[Pair]
    summary: dict[str, dict[str, Any]]
    only_a: list[str]
    only_b: list[str]
    failures: list[GateFailure]
    out: Path
    options: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    differences: dict[str, Any] = field(default_factory=dict)  # `run_differences`

    def to_json(self) -> dict[str, Any]:
        def run(r: RunData) -> dict[str, Any]:
            return {"folder": str(r.folder.resolve()), "name": r.name, "model": r.info.get("model"),
                    "data_config": r.info.get("data_config")}

        return finite({"run_a": run(self.run_a), "run_b": run(self.run_b), "options": self.options,
                       "differences": self.differences,
                       "summary": self.summary, "pairs": [p.to_json() for p in self.pairs],
                       "only_a": self.only_a, "only_b": self.only_b, "warnings": self.warnings,
                       "gates": [f.__dict__ | {"message": f.message()} for f in self.failures]})


def check_options(opts: CompareOptions) -> None:
    """Usage errors before any map is read."""
    for name in opts.fail_under:
        if name not in GATE_METRICS:
            raise unknown(f"--fail-under {name}", "comparison measure", name, GATE_METRICS)
    if not 2 <= opts.pool <= 1024:
        raise UsageError("--pool must be between 2 and 1024 (pixels per side)")
    if not 0 < opts.top <= 1:
        raise UsageError("--top must be a fraction in (0, 1]")
    if opts.strips < 0:
        raise UsageError("--strips must be at least 0")
    for folder in (opts.run_a, opts.run_b):
        if not Path(folder).is_dir() or not manifest_parts(Path(folder)):
            raise UsageError(f"{folder} is not an explain run folder (no manifest.jsonl)")


# -- pairing ------------------------------------------------------------------------------------------------
def _by_image(run: RunData, by_key: bool) -> dict[tuple[str, str], list[Row]]:
    """The run's rows grouped by (image identity, method label): identity = the file's sha256, or its key."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in run.rows:
        sha = row.record.sha256
        ident = f"key:{row.record.key}" if by_key or not sha else f"sha:{sha}"
        groups[(ident, row.label)].append(row)
    return groups


def _match(rows_a: list[Row], rows_b: list[Row]) -> list[tuple[Row, Row]]:
    """One map each: a pair (even if the explained classes differ); several (topk): pairs of equal targets."""
    if len(rows_a) == 1 and len(rows_b) == 1:
        return [(rows_a[0], rows_b[0])]
    targets = {row.target: row for row in rows_b}
    return [(a, targets[a.target]) for a in rows_a if a.target in targets]


def _method_map(run_a: RunData, run_b: RunData) -> dict[str, str]:
    """Method label of A -> label of B: the labels both runs have, or the only label of each (two methods)."""
    la, lb = sorted({r.label for r in run_a.rows}), sorted({r.label for r in run_b.rows})
    common = [label for label in la if label in lb]
    if common:
        return {label: label for label in common}
    if len(la) == 1 and len(lb) == 1:
        return {la[0]: lb[0]}
    raise UsageError(f"the runs share no method: {run_a.folder} has {', '.join(la) or 'none'}, {run_b.folder} has "
                     f"{', '.join(lb) or 'none'}")


def pair_runs(run_a: RunData, run_b: RunData) -> tuple[list[Pair], list[str], list[str]]:
    """The pairs of maps of the images both runs explained (by sha256, then by key for the rest), and the
    `key (method)` of the maps only one run has."""
    methods = _method_map(run_a, run_b)
    pairs: list[Pair] = []
    used: set[int] = set()
    for by_key in (False, True):
        ga = _by_image(RunData(run_a.folder, run_a.name, run_a.info, [r for r in run_a.rows if id(r) not in used]),
                       by_key)
        gb = _by_image(RunData(run_b.folder, run_b.name, run_b.info, [r for r in run_b.rows if id(r) not in used]),
                       by_key)
        for (ident, label_a), rows_a in sorted(ga.items()):
            label_b = methods.get(label_a)
            if label_b is None or (ident, label_b) not in gb:
                continue
            shown = label_a if label_a == label_b else f"{label_a} vs {label_b}"
            for a, b in _match(rows_a, gb[(ident, label_b)]):
                pairs.append(Pair(a, b, shown))
                used.update((id(a), id(b)))
    only_a = sorted(f"{r.record.key} ({r.label})" for r in run_a.rows if id(r) not in used)
    only_b = sorted(f"{r.record.key} ({r.label})" for r in run_b.rows if id(r) not in used)
    return pairs, only_a, only_b


# -- what differs between the runs -------------------------------------------------------------------------
PER_IMAGE = {"sigma", "noise_absolute", "noise_relative"}  # values a method records per image, not settings


def model_identity(source: dict[str, Any]) -> dict[str, Any]:
    """What says which model a run used: its source without file paths when the files' sha256 are recorded
    (the same weights read from another folder are the same model)."""
    if not source.get("sha256"):
        return dict(source)
    out = {k: v for k, v in source.items() if k not in ("weights", "files")}
    if isinstance(out.get("checkpoint"), dict):
        out["checkpoint"] = {k: v for k, v in out["checkpoint"].items() if k != "path"}
    return out


def model_text(source: dict[str, Any]) -> str:
    """`resnet18 sha256 ab12cd34..`: the model's name and the first digits of its weights' sha256."""
    name = str(source.get("name") or source.get("kind") or "model")
    digests = [str(v) for v in (source.get("sha256") or {}).values()] + \
        ([str(source["state_dict_sha256"])] if source.get("state_dict_sha256") else [])
    return f"{name} sha256 {digests[0][:8]}.." if digests else name


def _differing(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [value in a, value in b]} for the keys whose values differ (None: absent)."""
    def text(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if text(a.get(k)) != text(b.get(k))}


def _label_settings(run: RunData, label: str) -> dict[str, Any] | None:
    """The settings of a method label's maps (as asked: per-image `auto` values as `auto`, no per-image noise
    levels), or None when its maps do not all share them."""
    variants: dict[str, dict[str, Any]] = {}
    for r in run.rows:
        if r.label == label:
            settings = {k: v for k, v in r.record.asked.items() if k not in PER_IMAGE}
            variants[json.dumps(settings, sort_keys=True, default=str)] = settings
    return next(iter(variants.values())) if len(variants) == 1 else None


def run_differences(run_a: RunData, run_b: RunData, methods: dict[str, str]) -> dict[str, Any]:
    """What differs between the runs besides the maps: the model (weights sha256 / source), the preprocessing
    (data config), each compared method's settings; with `sentences`, one line per difference."""
    ma, mb = run_a.info.get("model") or {}, run_b.info.get("model") or {}
    out: dict[str, Any] = {"model": None, "data_config": _differing(run_a.info.get("data_config") or {},
                                                                    run_b.info.get("data_config") or {}),
                           "methods": {}, "sentences": []}
    if _differing(model_identity(ma), model_identity(mb)):
        out["model"] = {"a": model_text(ma), "b": model_text(mb)}
        out["sentences"].append(f"the runs used different models: A {model_text(ma)}, B {model_text(mb)}")
    if out["data_config"]:
        out["sentences"].append("different preprocessing: " + _pairs_text(out["data_config"]))
    for label_a, label_b in sorted(methods.items()):
        sa, sb = _label_settings(run_a, label_a), _label_settings(run_b, label_b)
        if sa is None or sb is None:
            continue
        diff = _differing(sa, sb)
        if diff:
            shown = label_a if label_a == label_b else f"{label_a} vs {label_b}"
            out["methods"][shown] = diff
            out["sentences"].append(f"different settings of {shown}: {_pairs_text(diff)}")
    return out


def _pairs_text(diff: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k} {_value(a)} vs {_value(b)}" for k, (a, b) in diff.items())


def _value(v: Any) -> str:
    if isinstance(v, list | tuple) and all(isinstance(x, int) for x in v):
        return "x".join(str(x) for x in v)
    return "none" if v is None else str(v)


# -- similarity ---------------------------------------------------------------------------------------------
def _shape(row: Row) -> tuple[int, int]:
    shape = row.record.map_shape or []
    if len(shape) >= 2:
        return int(shape[-2]), int(shape[-1])
    path = row.run.folder / str(row.record.npy)
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape[-2:])  # type: ignore[return-value]
    except (OSError, ValueError) as e:
        raise SaliencyError(f"cannot read the map {path} ({e})") from None


def pooled(m: torch.Tensor, side: int) -> torch.Tensor:
    """(R, H, W) maps -> (R, side * side): magnitudes average-pooled to side x side (no pooling if smaller)."""
    m = m.abs()[:, None]
    if m.shape[-2] > side or m.shape[-1] > side:
        m = torch.nn.functional.adaptive_avg_pool2d(m, (min(side, m.shape[-2]), min(side, m.shape[-1])))
    return m.flatten(1).double()


def top_mask(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """The top `fraction` (at least one) of the entries of each row of a (R, N), as a bool (R, N) mask."""
    k = max(1, math.ceil(fraction * a.shape[1]))
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)


def top_iou(a: torch.Tensor, b: torch.Tensor, fraction: float) -> torch.Tensor:
    """Intersection over union of the top `fraction` of entries of each row of a and b, (R, N) each -> (R,)."""
    ma, mb = top_mask(a, fraction), top_mask(b, fraction)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def similarity(a: torch.Tensor, b: torch.Tensor, side: int, fraction: float) -> tuple[list[float | None], list[float]]:
    """Spearman correlation (None where undefined) and top-region IoU of pooled |a| and |b|, (R, H, W) each;
    identical pooled maps score 1 on both."""
    pa, pb = pooled(a, side), pooled(b, side)
    rho = spearman(pa, pb).double()
    iou = top_iou(pa, pb, fraction)
    same = (pa == pb).all(1)
    rho = torch.where(same, torch.ones_like(rho), rho)
    iou = torch.where(same, torch.ones_like(iou), iou)
    return [None if not math.isfinite(v) else v for v in rho.tolist()], iou.tolist()


def score_pairs(pairs: list[Pair], opts: CompareOptions, warnings: list[str], on_progress: Progress | None) -> None:
    """Fill each pair's spearman and iou (B's map resized to A's shape when they differ), CHUNK pairs at once;
    a pair whose map cannot be read is dropped with a warning."""
    bad: list[int] = []
    for start in range(0, len(pairs), CHUNK):
        chunk = [(i, pairs[i]) for i in range(start, min(start + CHUNK, len(pairs)))]
        groups: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray]]] = defaultdict(list)
        for i, p in chunk:
            try:
                shape = _shape(p.a)
                groups[shape].append((i, load_map(p.a, shape), load_map(p.b, shape)))
            except SaliencyError as e:
                warnings.append(f"{p.key} ({p.method}): {e}")
                bad.append(i)
        for items in groups.values():
            a = torch.from_numpy(np.stack([m for _, m, _ in items]))
            b = torch.from_numpy(np.stack([m for _, _, m in items]))
            rho, iou = similarity(a, b, opts.pool, opts.top)
            for (i, _, _), r, o in zip(items, rho, iou, strict=True):
                pairs[i].spearman, pairs[i].iou = r, o
        if on_progress is not None:
            on_progress(min(start + CHUNK, len(pairs)), len(pairs))
    for i in reversed(bad):
        del pairs[i]


# -- gates, summaries, files -------------------------------------------------------------------------------
def gates(pairs: list[Pair], fail_under: dict[str, float]) -> list[GateFailure]:
    """Per-image gates: for each metric and method, fail when any pair's value is below the bound (or undefined);
    the failure names the worst image. Pairs are already sorted most changed first."""
    failures = []
    for metric, bound in fail_under.items():
        by_method: dict[str, list[Pair]] = defaultdict(list)
        for p in pairs:
            by_method[p.method].append(p)
        for method, group in sorted(by_method.items()):
            below = [p for p in group if getattr(p, metric) is None or getattr(p, metric) < bound]
            if below:
                worst = min(below, key=lambda p: (-math.inf if getattr(p, metric) is None else getattr(p, metric)))
                failures.append(GateFailure(metric, method, worst.key, getattr(worst, metric), bound, len(below),
                                            len(group)))
    return failures


def summarise(pairs: list[Pair]) -> dict[str, dict[str, Any]]:
    """Per method: mean and 95 % CI of spearman and iou over the images (undefined values left out)."""
    by_method: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_method[p.method].append(p)
    return {method: {m: mean_ci95([getattr(p, m) for p in group if getattr(p, m) is not None])
                     for m in GATE_METRICS} for method, group in sorted(by_method.items())}


def csv_text(pairs: list[Pair]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["key", "image", "method", "spearman", "iou", "target_a", "target_b", "npy_a", "npy_b", "strip"])
    for p in pairs:
        w.writerow([p.key, p.b.record.image, p.method, "" if p.spearman is None else f"{p.spearman:.6g}",
                    "" if p.iou is None else f"{p.iou:.6g}", p.a.record.target, p.b.record.target,
                    p.a.record.npy, p.b.record.npy, p.strip or ""])
    return buf.getvalue()


def _panel(row: Row, side: str) -> tuple[str, Any] | None:
    from PIL import Image

    overlay = row.record.overlay
    if not overlay:
        return None
    try:
        with Image.open(row.run.folder / overlay) as im:
            image = im.convert("RGB")
    except OSError:
        return None
    rec = row.record
    p = f", p = {rec.score:.3f}" if rec.score is not None else ""
    return f"{side}: {row.run.name} ({row.label})\n{rec.label or rec.target}{p}", image


def _regions_panel(pair: Pair, opts: CompareOptions) -> tuple[str, Any]:
    """The third panel of a strip: the two top regions that the IoU compares, on the pooled grid."""
    shape = _shape(pair.a)
    a = torch.from_numpy(load_map(pair.a, shape))[None]
    b = torch.from_numpy(load_map(pair.b, shape))[None]
    pa, pb = pooled(a, opts.pool), pooled(b, opts.pool)
    side = (min(opts.pool, shape[0]), min(opts.pool, shape[1]))
    ma, mb = (top_mask(p, opts.top)[0].reshape(side).numpy() for p in (pa, pb))
    caption = (f"top {100 * opts.top:g} % of pooled |map|, {side[0]}\u00d7{side[1]}\n"
               "blue: A only, orange: B only, purple: both")
    return caption, regions(ma, mb, 320)


def write_strip(pair: Pair, out: Path, opts: CompareOptions) -> str | None:
    """A PNG with the two overlays side by side and the two top regions, titled with the image, the method and
    the similarity; returns its path relative to `out` (None when an overlay or a map cannot be read)."""
    panels = [_panel(pair.a, "A"), _panel(pair.b, "B")]
    if any(p is None for p in panels):
        return None
    try:
        panels.append(_regions_panel(pair, opts))
    except SaliencyError:
        return None
    top = opts.top
    rho = "undefined" if pair.spearman is None else f"{pair.spearman:.3f}"
    iou = "undefined" if pair.iou is None else f"{pair.iou:.3f}"
    title = [f"{pair.key}: {pair.method}",
             f"Spearman {rho} (1 = same ranking of pooled |map|), top-{100 * top:g} % IoU {iou}"]
    rel = f"{STRIP_DIR}/{pair.key}.{pair.method.replace('/', '_').replace(' ', '_')}.png"
    write_png(out / rel, montage([p for p in panels if p is not None], title, columns=3, width=320))
    return rel


def write_files(cmp: Comparison, opts: CompareOptions) -> dict[str, str]:
    """comparison.json, comparison.csv and the strips of the `opts.strips` most changed pairs, under cmp.out."""
    strips = opts.strips
    for pair in cmp.pairs[:strips]:
        pair.strip = write_strip(pair, cmp.out, opts)
    files = write_comparison(cmp.out, cmp.to_json(), csv_text(cmp.pairs))
    files.update({f"strip{i}": str(cmp.out / p.strip) for i, p in enumerate(cmp.pairs[:strips]) if p.strip})
    return files


def compare_runs(opts: CompareOptions, on_progress: Progress | None = None) -> Comparison:
    """Read both runs, pair their maps, score, gate and write the files (see the module docstring)."""
    check_options(opts)
    run_a, run_b = read_run(Path(opts.run_a)), read_run(Path(opts.run_b))
    assign_labels([run_a])  # labels within each run: the same method has the same label in both
    assign_labels([run_b])
    pairs, only_a, only_b = pair_runs(run_a, run_b)
    if not pairs:
        raise UsageError(f"{opts.run_a} and {opts.run_b} share no image (by sha256 or key) with a map of the same "
                         "method")
    warnings: list[str] = []
    score_pairs(pairs, opts, warnings, on_progress)
    pairs.sort(key=Pair.changed)
    out = Path(opts.out) if opts.out is not None else Path(opts.run_b)
    options = {"pool": opts.pool, "top": opts.top, "fail_under": opts.fail_under, "magnitude": True}
    differences = run_differences(run_a, run_b, _method_map(run_a, run_b))
    failures = gates(pairs, opts.fail_under)
    for f in failures:  # a gate that fails says what else changed: the model, the preprocessing, its settings
        f.differences = "; ".join(t for t in differences["sentences"] if not t.startswith("different settings of")
                                  or t.startswith(f"different settings of {f.method}:"))
    cmp = Comparison(run_a, run_b, pairs, summarise(pairs), only_a, only_b, failures, out, options, warnings,
                     differences=differences)
    cmp.files = write_files(cmp, opts)
    return cmp
