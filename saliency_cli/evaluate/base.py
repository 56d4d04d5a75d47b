"""What every metric shares: the registry, the batch a metric scores, and the batched perturbation curve.

A metric is a function

    fn(batch: Batch, **options) -> Scores

batch holds R rows (one row = one image, one target and one map of one method), every tensor on the model's
device; it returns one number per row (NaN where the metric does not apply, e.g. no object region) and, for
curve metrics, the curve of every row. Adding a metric = one function with `@register`, one test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from saliency_cli.methods.base import Context
from saliency_cli.methods.base import baseline as method_baseline
from saliency_cli.oracle import GradientOracle

BASELINES = ("blur", "mean", "black")


@dataclass
class Batch:
    """R rows to score. Shapes: x (R, C, H, W) normalised inputs; target (R,) class indices; maps (R, H, W)
    float32 attribution maps as stored by the run (signed or not); regions (R, H, W) bool object masks in the
    map's frame, with has_region (R,) saying which rows have one (None: no localisation data at all)."""

    oracle: GradientOracle
    x: torch.Tensor
    target: torch.Tensor
    maps: torch.Tensor
    ctx: Context
    baseline: str = "blur"
    seeds: list[int] = field(default_factory=list)  # one per row: run seed and image bytes (data.image_seed)
    regions: torch.Tensor | None = None
    has_region: torch.Tensor | None = None
    ref: torch.Tensor | None = None  # the reference (R, C, H, W) when already computed (else: reference())

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        return self.x.shape[0]

    def generators(self, purpose: str) -> list[torch.Generator]:
        """One generator per row for `purpose` (a metric name), seeded from the row's seed and the purpose, so
        every method of an image is scored against the same random draws (paired comparison) while
        different metrics draw independently."""
        out = []
        for s in self.seeds or [0] * len(self):
            seed = (s * 1_000_003 + _stable_hash(purpose)) & ((1 << 63) - 1)
            out.append(torch.Generator(device=self.device).manual_seed(seed))
        return out

    def reference(self) -> torch.Tensor:
        """The infill of removed pixels (R, C, H, W): the input blurred, the mean colour, or black; defined in
        pixel space and normalised like the input (methods.base.baseline). Computed once per batch."""
        if self.ref is None:
            self.ref = method_baseline(self.x, self.baseline, self.ctx, self.generators("baseline"))
        return self.ref


def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@dataclass
class Scores:
    """values (R,) one number per row (NaN: not applicable); curves (R, S) and their x positions (S,) for
    curve metrics; x_label / y_label name the curve's axes for plots."""

    values: torch.Tensor
    curves: torch.Tensor | None = None
    curve_x: torch.Tensor | None = None
    x_label: str = ""
    y_label: str = ""


MetricFn = Callable[..., Scores]


@dataclass(frozen=True)
class Metric:
    """A registered metric and its metadata (listed by `saliency evaluate --list-metrics`).

    cost(options) is the number of forward passes per row (image and method) at those options. family: the
    module it lives in. needs_regions: only defined when --boxes/--masks give object regions.
    """

    name: str
    fn: MetricFn
    summary: str
    paper: str
    higher_is_better: bool
    defaults: dict[str, Any]
    cost: Callable[[dict[str, Any]], int]
    family: str
    needs_regions: bool = False
    default: bool = True  # part of the default metric set


REGISTRY: dict[str, Metric] = {}


def register(name: str, *, summary: str, paper: str, higher_is_better: bool, defaults: dict[str, Any],
             cost: Callable[[dict[str, Any]], int], needs_regions: bool = False,
             default: bool = True) -> Callable[[MetricFn], MetricFn]:
    """Register `fn` under its CLI name (the `--metrics` value)."""

    def wrap(fn: MetricFn) -> MetricFn:
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} registered twice")
        family = fn.__module__.rsplit(".", 1)[-1]
        REGISTRY[name] = Metric(name, fn, summary, paper, higher_is_better, dict(defaults), cost, family,
                                needs_regions, default)
        return fn

    return wrap


# -- helpers shared by the metrics ------------------------------------------------------------------------
def flat_rank(maps: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Position of every pixel in the order of its map value: (R, H, W) -> (R, H, W) int64, 0 = most salient.

    Ties keep raster order (stable sort), so the order is deterministic."""
    r = maps.shape[0]
    flat = maps.reshape(r, -1)
    order = torch.argsort(flat, dim=1, descending=descending, stable=True)  # (R, N): pixel index by rank
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand(r, -1))
    return rank.view_as(maps)


def trapezoid_mean(curves: torch.Tensor) -> torch.Tensor:
    """Area under (R, S) curves sampled at S evenly spaced points of [0, 1] (trapezoid rule): (R,)."""
    s = curves.shape[1]
    if s == 1:
        return curves[:, 0].clone()
    return (curves[:, 1:] + curves[:, :-1]).sum(1) / (2 * (s - 1))


@dataclass
class CurveOutputs:
    """Per (row, step), all (R, S): softmax probability and logit of the row's target, and whether the
    target is still the top-1 class."""

    prob: torch.Tensor
    logit: torch.Tensor
    top1: torch.Tensor


def perturbation_curve(oracle: GradientOracle, x: torch.Tensor, ref: torch.Tensor, target: torch.Tensor,
                       order: torch.Tensor, thresholds: torch.Tensor, *, invert: bool = False,
                       block: int | None = None) -> CurveOutputs:
    """The model's answer along a perturbation path, every step of every row batched through the oracle.

    Step s of row r shows `ref[r]` where `order[r] < thresholds[s]` and `x[r]` elsewhere (with `invert`, the
    other way round: `x` where `order < threshold`). x, ref: (R, C, H, W); order: (R, H, W) integer
    (pixel ranks, window indices, ...); thresholds: (S,). The R*S inputs are built `block` at a time (a
    few oracle chunks) and never all held at once; one Python iteration per block, not per step.
    """
    r, s = x.shape[0], thresholds.shape[0]
    total = r * s
    block = block or max(s, 4 * oracle.batch_size)
    thresholds = thresholds.to(device=x.device)
    probs, logits, top1 = (torch.empty(total, device=x.device) for _ in range(3))
    for start in range(0, total, block):
        idx = torch.arange(start, min(total, start + block), device=x.device)
        row, step = idx // s, idx % s
        mask = order[row] < thresholds[step].view(-1, 1, 1)  # (blk, H, W)
        if invert:
            mask = ~mask
        inputs = torch.where(mask[:, None], ref[row], x[row])  # (blk, C, H, W)
        out = oracle.logits(inputs)  # (blk, K)
        t = target[row]
        logits[start:start + len(idx)] = out.gather(1, t.view(-1, 1)).squeeze(1)
        probs[start:start + len(idx)] = out.softmax(1).gather(1, t.view(-1, 1)).squeeze(1)
        top1[start:start + len(idx)] = (out.argmax(1) == t).float()
    return CurveOutputs(probs.view(r, s), logits.view(r, s), top1.view(r, s))


def pixel_thresholds(n_pixels: int, steps: int, device: torch.device) -> torch.Tensor:
    """Pixel counts 0, N/steps, ..., N (steps + 1 values, rounded): how many pixels are perturbed per step."""
    return torch.round(torch.linspace(0, n_pixels, steps + 1, device=device, dtype=torch.float64)).long()


# -- statistics -------------------------------------------------------------------------------------------
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with df degrees of freedom (table; between entries the next smaller
    df's value, which is conservative; 1.96 beyond 120)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df in _T975:
        return _T975[df]
    if df > 120:
        return 1.96
    return _T975[max(k for k in _T975 if k < df)]


def mean_ci95(values: list[float]) -> dict[str, float | int | None]:
    """Mean, half-width of its 95 % confidence interval (t interval, sample std) and n of the finite values.

    ci95 is None when n < 2; mean is None when n = 0."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(finite) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    var = sum((v - mean) ** 2 for v in finite) / (n - 1)
    return {"mean": mean, "ci95": t_quantile_975(n - 1) * math.sqrt(var / n), "n": n}


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of a and b, (R, ...) each -> (R,). Ties get their average rank.
    NaN where a row is constant."""
    ra, rb = average_ranks(a.reshape(a.shape[0], -1)), average_ranks(b.reshape(b.shape[0], -1))
    return pearson(ra, rb)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row, (R, N) each -> (R,), in float64; NaN for a constant row."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    out = (a * b).sum(1) / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan"))).float()


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 of each row of v (R, N), ties sharing their average rank: (R, N) float64."""
    r, n = v.shape
    values, order = v.sort(dim=1, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.long().cumsum(1) - 1  # (R, N) tie-group id of each sorted position
    pos = torch.arange(n, device=v.device, dtype=torch.float64).expand(r, -1)
    sums = torch.zeros(r, n, dtype=torch.float64, device=v.device).scatter_add_(1, group, pos)
    counts = torch.zeros(r, n, dtype=torch.float64, device=v.device).scatter_add_(1, group, torch.ones_like(pos))
    avg = sums.gather(1, group) / counts.gather(1, group)
    return torch.empty_like(avg).scatter_(1, order, avg)
