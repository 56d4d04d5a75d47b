"""The metrics of `saliency evaluate`, one module per family, each registered with its metadata.

faithfulness (deletion, insertion, aupc, keep, remove), smoothness (noise, sparseness), localisation (pointing,
energy): `METRICS`; the sanity checks (randomization, perturbation): `SANITY_CHECKS`. Importing this package
registers them all. Nothing here reads run folders or orchestrates: that is `pipeline/evaluate.py`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from saliency_cli.data import InputRange
from saliency_cli.metrics import faithfulness, localisation, smoothness  # noqa: F401 - they register metrics
from saliency_cli.metrics.base import BASELINES, METRICS, Batch, Metric, Scores, merge_options, register
from saliency_cli.metrics.sanity import SANITY_CHECKS, SanityCheck, SanityResult, register_check
from saliency_cli.oracle import GradientOracle

__all__ = ["BASELINES", "METRICS", "SANITY_CHECKS", "Batch", "Metric", "SanityCheck", "SanityResult", "Scores",
           "higher_is_better", "merge_options", "metric_rows", "register", "register_check", "score_maps",
           "scorer_for"]


def score_maps(metric: str, oracle: GradientOracle, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor,
               bounds: InputRange, *, seeds: list[int] | None = None, baseline: str = "blur",
               **options: Any) -> torch.Tensor:
    """One registered metric on in-memory maps, without a run folder: x (B, C, H, W), target (B,), maps
    (B, H, W) or (B, C, H, W) (then sum_c |m_c|), bounds the input's valid range, all on the model's device ->
    (B,) values. For methods that tune themselves against a metric (SmoothTaylor's adaptive noising uses
    `aupc` or `noise`). An unknown option is a UsageError."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    m = METRICS[metric]
    if maps.dim() == 4:
        maps = maps.abs().sum(1)
    batch = Batch(oracle=oracle, x=x, target=target, maps=maps.float(), bounds=bounds, baseline=baseline,
                  seeds=list(seeds) if seeds is not None else [0] * x.shape[0])
    return m.fn(batch, **merge_options(metric, m.defaults, options)).values


def scorer_for(bounds: InputRange) -> functools.partial[torch.Tensor]:
    """`score_maps` with the input range bound: the `MethodContext.scorer` of a run
    (`scorer(metric, oracle, x, target, maps) -> (B,)`), default seeds and baseline."""
    return functools.partial(score_maps, bounds=bounds)


def higher_is_better(name: str) -> bool:
    """Whether a larger value of the metric or sanity check `name` is better."""
    return METRICS[name].higher_is_better if name in METRICS else SANITY_CHECKS[name].higher_is_better


def metric_rows() -> list[dict[str, Any]]:
    """Every metric and sanity check with its metadata, as `saliency evaluate --list-metrics` lists them."""
    rows: list[dict[str, Any]] = [
        {"name": m.name, "family": m.family, "summary": m.summary, "higher_is_better": m.higher_is_better,
         "defaults": m.defaults, "forward_passes_per_image": m.cost(m.defaults), "default": m.default,
         "needs_regions": m.needs_regions, "paper": m.paper} for m in METRICS.values()]
    rows += [{"name": s.name, "family": "sanity", "summary": s.summary, "higher_is_better": s.higher_is_better,
              "defaults": s.defaults, "map_recomputations_per_image": s.cost(s.defaults), "default": False,
              "needs_regions": False, "paper": s.paper} for s in SANITY_CHECKS.values()]
    return rows
