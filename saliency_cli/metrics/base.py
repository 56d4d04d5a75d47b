"""What every metric shares: the registry, the batch a metric scores, and the batched perturbation curve.

A metric is a function

    fn(batch: Batch, **options) -> Scores

batch holds R rows (one row = one image, one target and one map of one method), every tensor on the model's
device; it returns one number per row (NaN where the metric does not apply, e.g. no object region) and, for
curve metrics, the curve of every row. Adding a metric = one function with `@register`, one test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from saliency_cli.data import InputRange
from saliency_cli.data import baseline as method_baseline
from saliency_cli.errors import UsageError
from saliency_cli.numerics import mean_ci95, purpose_seed, seeded_generator
from saliency_cli.oracle import GradientOracle

__all__ = ["BASELINES", "METRICS", "Batch", "CurveOutputs", "Metric", "MetricFn", "Scores", "flat_rank",
           "mean_curves", "merge_options", "perturbation_curve", "pixel_thresholds", "register"]

BASELINES = ("blur", "mean", "black")  # the infills of removed pixels a metric may use (--baseline)


@dataclass
class Batch:
    """R rows to score. Shapes: x (R, C, H, W) normalised inputs; target (R,) class indices; maps (R, H, W)
    float32 attribution maps as stored by the run (signed or not); regions (R, H, W) bool object masks in the
    map's frame, with has_region (R,) saying which rows have one (None: no localisation data at all)."""

    oracle: GradientOracle
    x: torch.Tensor
    target: torch.Tensor
    maps: torch.Tensor
    bounds: InputRange  # the valid range of the normalised input, on the batch's device
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
        return [seeded_generator(purpose_seed(s, purpose), self.device) for s in self.seeds or [0] * len(self)]

    def reference(self) -> torch.Tensor:
        """The infill of removed pixels (R, C, H, W): the input blurred, the mean colour, or black; defined in
        pixel space and normalised like the input (methods.base.baseline). Computed once per batch."""
        if self.ref is None:
            self.ref = method_baseline(self.x, self.baseline, self.bounds, self.generators("baseline"))
        return self.ref


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


METRICS: dict[str, Metric] = {}


def register(name: str, *, summary: str, paper: str, higher_is_better: bool, defaults: dict[str, Any],
             cost: Callable[[dict[str, Any]], int], needs_regions: bool = False,
             default: bool = True) -> Callable[[MetricFn], MetricFn]:
    """Register `fn` under its CLI name (the `--metrics` value)."""

    def wrap(fn: MetricFn) -> MetricFn:
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        family = fn.__module__.rsplit(".", 1)[-1]
        METRICS[name] = Metric(name, fn, summary, paper, higher_is_better, dict(defaults), cost, family,
                                needs_regions, default)
        return fn

    return wrap


def merge_options(name: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A metric's (or sanity check's) options: its defaults, overridden by `given`; an unknown key is a UsageError."""
    unknown = set(given) - set(defaults)
    if unknown:
        raise UsageError(f"{name}: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(defaults) or 'none'})")
    return {**defaults, **given}


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


@dataclass
class CurveOutputs:
    """Per (row, step), all (R, S): probability (softmax, or sigmoid for a multi-label model) and logit of the
    row's target, and whether the target is still the top-1 class."""

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
        probs[start:start + len(idx)] = oracle.class_probabilities(out).gather(1, t.view(-1, 1)).squeeze(1)
        top1[start:start + len(idx)] = (out.argmax(1) == t).float()
    return CurveOutputs(probs.view(r, s), logits.view(r, s), top1.view(r, s))


def pixel_thresholds(n_pixels: int, steps: int, device: torch.device) -> torch.Tensor:
    """Pixel counts 0, N/steps, ..., N (steps + 1 values, rounded): how many pixels are perturbed per step."""
    return torch.round(torch.linspace(0, n_pixels, steps + 1, device=device, dtype=torch.float64)).long()


# -- statistics over rows ---------------------------------------------------------------------------------
def mean_curves(curves: list[list[float]]) -> dict[str, Any]:
    """Mean and 95 % CI half-width at each point of equally long curves (the most common length)."""
    length = Counter(len(c) for c in curves).most_common(1)[0][0]
    same = [c for c in curves if len(c) == length]
    stats = [mean_ci95([c[i] for c in same]) for i in range(length)]
    return {"mean": [s["mean"] for s in stats], "ci95": [s["ci95"] for s in stats], "n": len(same)}
